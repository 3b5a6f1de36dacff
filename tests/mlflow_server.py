"""A real `mlflow server` for tests: 127.0.0.1, a free port, sqlite backend and artifacts under a temp dir.

Measured recipe (MLflow 3.17): with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false and --workers 1 the
server is healthy in 7-15 s and starts no huey consumers; it still forks a uvicorn worker, so it runs
in its own process group (session) and teardown stops the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sempa_dist.distributed import free_port


class MlflowServer:
    """One `mlflow server` process group. `start()` waits for /health; `kill()` is a crash (SIGKILL);
    `stop()` a clean shutdown. Restarting on the same `root` keeps the backend database."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "backend.db"
        self.artifacts = self.root / "artifacts"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> float:
        """Start and wait until healthy; returns the seconds it took."""
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server writes it until stopped
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the group id is the leader's pid (start_new_session)

    def kill(self) -> None:
        """A crash: SIGKILL to every process of the server, no shutdown."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 15 s; then SIGKILL whatever of the group is left."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(30)
        self._signal_group(signal.SIGKILL)  # workers outliving their parent
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A running server for the module, stopped (whole process group) at teardown."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
