"""Helpers for tests that start real processes (torchrun / sempa-train)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process a test starts: this checkout first on the path (whatever an
    editable install elsewhere points at), unbuffered output, then `extra`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra)


def run(cmd: list[str], timeout: int = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` from the repo root in its own session; raise with the output's tail on failure (if check)."""
    full_env = child_env(**(env or {}))
    # own session: on timeout the whole tree (launcher and every rank) is killed, never orphaned
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout}s:\n" + "\n".join((out + err).splitlines()[-40:])) from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def sempa_train(*args: str, timeout: int = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sempa_dist.cli.train", *args], timeout=timeout, env=env, check=check)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
