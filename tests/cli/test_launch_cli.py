"""sempa-launch's command line: files it writes, the command it prints, its refusals (no launch here;
tests/test_launch.py launches for real)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from sempa_dist.cli.launch import main
from sempa_dist.launch import select_env

pytestmark = pytest.mark.real_component  # under CI=true a skip here (no ssh/pdsh) fails: conftest.py


def test_dry_run_writes_hostfile_env_and_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for k in select_env(dict(os.environ)):  # whatever this machine has set that would be passed on
        monkeypatch.delenv(k)
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env_file = tmp_path / "nccl.env"
    env_file.write_text("# fabric\nNCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5_0\n")
    from tests.distributed import REPO

    out = tmp_path / "run"
    rc = main(["--hosts", "node1,node2", "--gpus-per-host", "8", "--master-port", "29600", "--env-file", str(env_file),
               "--env", "EXTRA=1", "--dry-run", str(REPO / "configs" / "tiny_cpu.yaml"), f"train.output_dir={out}",
               "train.global_batch_size=32"])
    assert rc == 0
    launch = out / "launch"
    assert (launch / "hostfile").read_text() == "node1 slots=8\nnode2 slots=8\n"
    assert (launch / ".deepspeed_env").read_text() == (
        f"EXTRA=1\nHF_HOME=/cache/hf\nMLFLOW_TRACKING_URI=http://mlflow:5000\nNCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5_0\n"
        f"PYTHONPATH={tmp_path}\n")
    printed = capsys.readouterr().out
    assert "2 hosts x 8 ranks = world 16, rendezvous node1:29600" in printed
    assert "HF_TOKEN" not in printed and "hf_secret" not in (launch / ".deepspeed_env").read_text()
    command = (launch / "command.sh").read_text()
    assert command.startswith(f"DS_ENV_FILE={launch / '.deepspeed_env'} ")
    assert "-m deepspeed.launcher.runner --hostfile" in command and "--module sempa_dist.train" in command
    assert command.rstrip().endswith("train.global_batch_size=32")


def test_environment_wins_over_env_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # one run with more logging, without editing the file
    env_file = tmp_path / "nccl.env"
    env_file.write_text("NCCL_DEBUG=WARN\n")
    from tests.distributed import REPO

    rc = main(["--hosts", "a", "--gpus-per-host", "2", "--env-file", str(env_file), "--dry-run",
               str(REPO / "configs" / "tiny_cpu.yaml"), f"train.output_dir={tmp_path / 'r'}"])
    assert rc == 0
    assert "NCCL_DEBUG=INFO\n" in (tmp_path / "r" / "launch" / ".deepspeed_env").read_text()


@pytest.mark.parametrize("args, message", [
    (["--hosts", "a,b"], "no slots for a"),
    (["--hosts", "a,b,c", "--gpus-per-host", "1"], "not divisible by the world size 3"),
    (["--hosts", "a", "--gpus-per-host", "1", "--env", "SURELY_NOT_SET_42"], "not set in this environment"),
])
def test_refusals_exit_2_with_the_reason(tmp_path, capsys, args, message):
    from tests.distributed import REPO

    rc = main([*args, "--dry-run", str(REPO / "configs" / "tiny_cpu.yaml"), f"train.output_dir={tmp_path}"])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (scripts/system_deps.sh installs openssh-client)")
def test_unreachable_host_exits_3_before_launching(tmp_path, capsys):
    from tests.distributed import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rc = main(["--hosts", "127.0.0.1", "--gpus-per-host", "2", "--ssh-port", str(closed), "--ssh-timeout", "2",
               str(REPO / "configs" / "tiny_cpu.yaml"), f"train.output_dir={tmp_path}"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "ssh 127.0.0.1:" in err and "refused" in err.lower()
