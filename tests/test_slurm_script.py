"""slurm/ without a Slurm cluster: the values in slurm/nccl.env, and train_8x8.sh's torch version check.

The script runs under plain bash with the environment sbatch would give it (SLURM_JOB_ID, SLURM_NNODES,
SLURM_JOB_NODELIST) and stub `srun`/`scontrol` first on PATH that only record their arguments, so a
test sees whether the job would have been launched, and with which torchrun flags. tests/test_slurm.py
runs the same script on a real two-node cluster.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from sempa_dist.launch import read_env_file
from tests.distributed import REPO

SCRIPT = REPO / "slurm" / "train_8x8.sh"
TORCH_MIN = "2.12"  # torchrun --signals_to_handle: torch 2.10; --shutdown_timeout: torch 2.12


def test_nccl_env_ib_values_in_documented_ranges():
    """NCCL's environment variables page: NCCL_IB_RETRY_CNT is 0-7 (the InfiniBand retry count is a
    3-bit field of the queue pair), NCCL_IB_TIMEOUT 1-31 (0 or 32+ is an infinite timeout)."""
    env = read_env_file(REPO / "slurm" / "nccl.env")  # the reader sempa-launch --env-file uses
    retry, timeout = env["NCCL_IB_RETRY_CNT"], env["NCCL_IB_TIMEOUT"]
    assert retry.isdigit() and 0 <= int(retry) <= 7, f"NCCL_IB_RETRY_CNT={retry}: must be 0-7"
    assert timeout.isdigit() and 1 <= int(timeout) <= 31, f"NCCL_IB_TIMEOUT={timeout}: must be 1-31"


# sitecustomize for the fake python: the real torch, reporting another __version__ to whoever imports it
# (the script's check, and the config check that runs next)
FAKE_TORCH_VERSION = """
import importlib.abc, importlib.machinery, sys

class _FakeTorchVersion(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.__version__ = module.torch_version.TorchVersion({version!r})

        spec.loader.exec_module = exec_and_patch
        return spec

sys.meta_path.insert(0, _FakeTorchVersion())
"""


def fake_python(tmp_path: Path, torch_version: str) -> Path:
    """An executable that is this python, but its torch says it is `torch_version`: what a cluster's
    python with an older (or newer) torch answers to the script's check."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_TORCH_VERSION.format(version=torch_version))
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" '
                  f'exec {shlex.quote(sys.executable)} "$@"\n')
    py.chmod(0o755)
    return py


def run_script(tmp_path: Path, python: str | Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """train_8x8.sh configs/tiny_cpu.yaml as sbatch would start it on one node; returns the finished
    process and the calls of the stub srun/scontrol, each as [name, *args]."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        # the job's node list; nothing else is asked of scontrol on this path (SEMPA_MASTER_ADDR is set)
        "scontrol": '[ "$1 $2" = "show hostnames" ] && echo n1\nexit 0\n',
        "srun": "exit 0\n",
    }
    for name, body in stubs.items():
        stub = bin_dir / name
        # one record per call: a "\0== name" line, then one argument per line
        stub.write_text(f"#!/bin/bash\n{{ printf '\\0== %s\\n' {name}; printf '%s\\n' \"$@\"; }} "
                        f">>{shlex.quote(str(calls))}\n{body}")
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="n1", SLURM_SUBMIT_DIR=str(REPO), SEMPA_PYTHON=str(python),
               SEMPA_MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = ["bash", str(SCRIPT), "configs/tiny_cpu.yaml", f"train.output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    records = calls.read_text().split("\0== ")[1:] if calls.exists() else []
    return proc, [record.splitlines() for record in records]


@pytest.mark.parametrize("version", ["2.4.1", "2.9.1", "2.11.0"])
def test_old_torch_stops_before_launch_with_one_line(tmp_path, version):
    """torch 2.9.1 is what the script's comment once said was enough; 2.11 has --signals_to_handle but
    not --shutdown_timeout. The job fails at once (exit 2): one line on stderr that names the version
    found, the version needed and what to do; nothing started, no output directory."""
    proc, calls = run_script(tmp_path, fake_python(tmp_path, version))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert f"torch {version} in {tmp_path / 'python'} is too old" in lines[0], lines[0]
    assert f"torch >= {TORCH_MIN}" in lines[0] and "pip install" in lines[0] and "SEMPA_PYTHON" in lines[0]
    assert proc.stdout == "" and calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("version", ["2.12.0", "2.13.0a0+git1234567"])
def test_new_enough_torch_launches_with_signal_flags(tmp_path, version):
    """2.12 and later pass, a local build's suffix too; srun then starts torchrun with the preemption
    flags. (2.9.1 failing above shows major.minor is compared as numbers, not as text.)"""
    proc, calls = run_script(tmp_path, fake_python(tmp_path, version))
    assert proc.returncode == 0 and "too old" not in proc.stderr, proc.stdout + proc.stderr
    srun = [call for call in calls if call[0] == "srun"]
    assert len(srun) == 1, calls
    assert "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in srun[0], srun[0]
    assert "--shutdown_timeout=170" in srun[0] and "srun exited 0" in proc.stdout


def test_installed_torch_passes(tmp_path):
    """This environment's own torch (the one `make setup` installs) passes the check."""
    proc, calls = run_script(tmp_path, sys.executable)
    assert proc.returncode == 0 and "too old" not in proc.stderr, \
        (metadata.version("torch"), proc.stdout + proc.stderr)
    assert [call[0] for call in calls].count("srun") == 1, calls
