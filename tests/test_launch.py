"""sempa_dist.launch (hostfile, .deepspeed_env, ssh check, DeepSpeed command line), checked against
DeepSpeed's own parsers, and a real `sempa-launch` run: pdsh over ssh to localhost, through an sshd of
the test's own (a free port on 127.0.0.1, throwaway host and user keys), 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sempa_dist.launch import (
    LaunchError,
    check_ssh,
    deepspeed_command,
    deepspeed_env_text,
    hostfile_text,
    launcher_environ,
    parse_hosts,
    read_env_file,
    select_env,
    ssh_command,
    write_deepspeed_env,
)
from tests.distributed import REPO, metrics, run

pytestmark = pytest.mark.real_component  # under CI=true a skip here (no ssh/pdsh) fails: conftest.py

# --------------------------------------------------------------------------------------------------
# hosts and hostfile


def test_hosts_from_comma_list_keep_order():
    assert parse_hosts("b, a,c", gpus_per_host=8) == {"b": 8, "a": 8, "c": 8}
    assert list(parse_hosts("b,a", gpus_per_host=1)) == ["b", "a"]  # the first host is rank 0's


def test_hosts_from_file_with_comments_and_slots(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster A\nnode1 slots=4\n\nnode2   # default slots\n10.0.0.3 slots=2\n")
    assert parse_hosts(hostfile=f, gpus_per_host=8) == {"node1": 4, "node2": 8, "10.0.0.3": 2}


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"hosts": "a", "hostfile": "x"}, "exactly one"),
    ({"hosts": "a,a", "gpus_per_host": 1}, "listed twice"),
    ({"hosts": "a,b"}, "no slots for a"),
    ({"hosts": "a;rm -rf", "gpus_per_host": 1}, "not a host name"),
    ({"hosts": " , ", "gpus_per_host": 1}, "no hosts"),
    ({"hosts": "a", "gpus_per_host": 0}, "at least 1 slot"),
])
def test_bad_host_lists_are_refused(kwargs, match):
    with pytest.raises(LaunchError, match=match):
        parse_hosts(**kwargs)


def test_bad_hostfile_line_names_file_and_line(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("a slots=1\nb gpus=2\n")
    with pytest.raises(LaunchError, match=r"hosts:2: expected 'host' or 'host slots=N'"):
        parse_hosts(hostfile=f)
    with pytest.raises(LaunchError, match="not found"):
        parse_hosts(hostfile=tmp_path / "missing")


def test_hostfile_is_what_deepspeed_reads():
    from deepspeed.launcher.runner import _parse_hostfile

    hosts = {"node1": 8, "node2": 8, "10.0.0.3": 4}
    assert dict(_parse_hostfile(hostfile_text(hosts).splitlines())) == hosts


# --------------------------------------------------------------------------------------------------
# environment


def test_env_file_is_parsed_like_the_slurm_script_does(tmp_path):
    f = tmp_path / "x.env"
    f.write_text("# comment\n\nNCCL_DEBUG=WARN\nexport NCCL_SOCKET_IFNAME='^lo,docker0'\n  A_B=\"x y\"  \n")
    assert read_env_file(f) == {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "^lo,docker0", "A_B": "x y"}
    f.write_text("NCCL_DEBUG\n")
    with pytest.raises(LaunchError, match=r"x.env:1: expected KEY=VALUE"):
        read_env_file(f)
    assert set(read_env_file(REPO / "slurm" / "nccl.env")) >= {"NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def test_selected_env_has_caches_tracking_nccl_and_no_secrets():
    environ = {"PYTHONPATH": "/repo", "HF_HOME": "/cache/hf", "HF_TOKEN": "hf_secret", "MLFLOW_TRACKING_URI": "http://m:5000",
               "MLFLOW_TRACKING_PASSWORD": "pw", "NCCL_DEBUG": "WARN", "NCCL_IB_HCA": "mlx5", "AWS_SECRET_ACCESS_KEY": "s",
               "HOME": "/root", "SSH_AUTH_SOCK": "/tmp/agent", "SEMPA_DATA_DIR": "/data", "SEMPA_API_KEY": "k"}
    env = select_env(environ)
    assert env == {"HF_HOME": "/cache/hf", "MLFLOW_TRACKING_URI": "http://m:5000", "NCCL_DEBUG": "WARN",
                   "NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/repo", "SEMPA_DATA_DIR": "/data"}
    # a secret goes only when asked for by name
    assert select_env(environ, {"HF_TOKEN": "hf_secret"})["HF_TOKEN"] == "hf_secret"
    # the same rule as tracking's redaction: a look-alike listed in ENV_NAMES goes, other credentials do not
    more = {"TOKENIZERS_PARALLELISM": "false", "MLFLOW_DB_PASSWD": "p", "HF_CREDENTIALS_FILE": "/c"}
    assert select_env(more) == {"TOKENIZERS_PARALLELISM": "false"}


def test_deepspeed_env_file_is_strict_key_value(tmp_path):
    text = deepspeed_env_text({"A": "1", "NCCL_SOCKET_IFNAME": "^lo,docker0", "P": "/x:/y"})
    assert text == "A=1\nNCCL_SOCKET_IFNAME=^lo,docker0\nP=/x:/y\n"
    # DeepSpeed's reader: every line is split once on '=', no comments or blank lines survive it
    assert all(len(line.split("=", maxsplit=1)) == 2 for line in text.splitlines(keepends=True))
    for bad in ('say "hi"', "$HOME/x", "a`b`", "a\\b", "two\nlines"):
        with pytest.raises(LaunchError, match="remote shell"):
            deepspeed_env_text({"V": bad})
    path = write_deepspeed_env(tmp_path / "launch" / ".deepspeed_env", {"A": "1"})
    assert path.read_text() == "A=1\n" and (path.stat().st_mode & 0o777) == 0o600


def test_launcher_environment_drops_secrets_deepspeed_would_export(tmp_path):
    environ = {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_URI": "u", "PYTHONPATH": "/r", "SSH_AUTH_SOCK": "/a",
               "PATH": "/bin"}
    env = launcher_environ(environ, {}, tmp_path / ".deepspeed_env")
    assert "MLFLOW_TRACKING_TOKEN" not in env and env["MLFLOW_TRACKING_URI"] == "u" and env["SSH_AUTH_SOCK"] == "/a"
    assert env["DS_ENV_FILE"] == str((tmp_path / ".deepspeed_env").resolve())
    assert launcher_environ(environ, {"MLFLOW_TRACKING_TOKEN": "t"}, tmp_path / "e")["MLFLOW_TRACKING_TOKEN"] == "t"


# --------------------------------------------------------------------------------------------------
# ssh and the command line


def test_ssh_command_never_prompts_and_times_out():
    cmd = ssh_command("node1", 2222, ["-i", "/k"], timeout_s=3)
    assert cmd[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3"]
    assert cmd[-4:] == ["-p", "2222", "node1", "true"] and "-i" in cmd


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections are refused


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (scripts/system_deps.sh installs openssh-client)")
def test_ssh_check_reports_unreachable_hosts_fast():
    t0 = time.monotonic()
    result = check_ssh(["127.0.0.1", "no-such-host.invalid"], ssh_port=_closed_port(), timeout_s=2)
    assert time.monotonic() - t0 < 10
    assert result["127.0.0.1"] and "refused" in result["127.0.0.1"].lower()
    assert result["no-such-host.invalid"]


def test_deepspeed_command_is_what_the_runner_accepts():
    from deepspeed.launcher.runner import parse_args

    cmd = deepspeed_command("/l/hostfile", "configs/x.yaml", ["train.max_steps=5"], master_addr="node1",
                            master_port=29555, ssh_port=2222, python="/venv/bin/python")
    assert cmd[:3] == ["/venv/bin/python", "-m", "deepspeed.launcher.runner"]
    args = parse_args(cmd[3:])
    assert (args.hostfile, args.launcher, args.master_addr, args.master_port, args.ssh_port) == (
        "/l/hostfile", "pdsh", "node1", 29555, 2222)
    assert args.force_multi and args.no_ssh_check and args.no_local_rank and args.module
    assert args.user_script == "sempa_dist.train" and args.user_args == ["configs/x.yaml", "train.max_steps=5"]


# --------------------------------------------------------------------------------------------------
# the real thing: sempa-launch -> deepspeed -> pdsh -> ssh localhost -> 2 ranks


def _sshd_missing() -> str | None:
    absent = [p for p in ("pdsh", "ssh", "ssh-keygen") if shutil.which(p) is None]
    if absent or not Path("/usr/sbin/sshd").exists():
        return f"pdsh/openssh not installed ({', '.join(absent) or 'sshd'} missing; scripts/system_deps.sh installs them)"
    if os.geteuid() != 0:
        return "the throwaway sshd needs root (privilege separation directory /run/sshd, login as root)"
    return None


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """sshd on a free port of 127.0.0.1 with its own host key, one authorised throwaway user key, and
    PDSH_SSH_ARGS_APPEND that makes pdsh (and our check) use exactly that; stopped by PID."""
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d}/host_key", f"PidFile {d}/sshd.pid",
        f"AuthorizedKeysFile {d}/authorized_keys", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        # no PAM session set-up and no ownership checks of the temp directory: a test sshd, not a login host
        "UsePAM no", "StrictModes no", "LogLevel VERBOSE", ""]))
    # sshd insists on its privilege separation directory; the openssh-server package creates it only
    # when the service starts, which it never does in a container
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(d / "sshd.log", "w")  # noqa: SIM115 (open for the daemon's lifetime)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ssh_args = (f"-F /dev/null -i {d}/user_key -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    try:
        deadline = time.monotonic() + 15
        while check_ssh(["localhost"], port, ssh_args.split(), timeout_s=2)["localhost"]:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not accept the key: " + (d / "sshd.log").read_text()
            time.sleep(0.2)
        yield {"port": port, "ssh_args": ssh_args, "log": d / "sshd.log"}
    finally:
        # sessions (and what a failed launch left in them) are sshd's children: stop them, then sshd
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(_sshd_missing() is not None, reason=str(_sshd_missing()))
def test_sempa_launch_trains_through_pdsh_over_ssh(sshd, tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    # a sitecustomize on PYTHONPATH records each rank's environment: what really reached the ranks
    (probe / "sitecustomize.py").write_text(
        "import json, os\n"
        "if 'RANK' in os.environ and 'LOCAL_RANK' in os.environ and 'PROBE_DIR' in os.environ:\n"
        "    with open(os.path.join(os.environ['PROBE_DIR'], 'env-' + os.environ['RANK'] + '.json'), 'w') as fh:\n"
        "        json.dump(dict(os.environ), fh)\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    monkeypatch.setenv("PYTHONPATH", str(probe))  # run() puts this checkout in front
    env = {"PDSH_SSH_ARGS_APPEND": sshd["ssh_args"],
           "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           # secrets: neither may reach the ranks (DeepSpeed itself would export the MLFLOW_ one)
           "MLFLOW_TRACKING_TOKEN": "hunter2", "SEMPA_API_KEY": "hunter3"}
    t0 = time.monotonic()
    proc = run([sys.executable, "-m", "sempa_dist.cli.launch", "--hostfile-in", str(hosts), "--ssh-port", str(sshd["port"]),
                "--master-port", str(master_port), "--env", f"PROBE_DIR={probe}", "--env-file", "slurm/nccl.env",
                "configs/tiny_cpu.yaml", f"train.output_dir={out}", "train.max_steps=6", "train.save_every=0",
                "train.export=false"], timeout=240, env=env)
    seconds = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    assert "cmd = pdsh -S -f 1024 -w localhost" in text and "localhost: " in text, text[-3000:]
    assert "Accepted publickey for root" in sshd["log"].read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))
    assert (out / "launch" / "hostfile").read_text() == "localhost slots=2\n"
    for rank in (0, 1):
        rank_env = json.loads((probe / f"env-{rank}.json").read_text())
        assert rank_env["WORLD_SIZE"] == "2" and rank_env["LOCAL_RANK"] == str(rank)
        assert "SSH_CONNECTION" in rank_env  # started by sshd, not by this process
        assert rank_env["NCCL_DEBUG"] == "WARN" and rank_env["HF_DATASETS_OFFLINE"] == "1"
        assert rank_env["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
        assert rank_env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
        assert "MLFLOW_TRACKING_TOKEN" not in rank_env and "SEMPA_API_KEY" not in rank_env
    print(f"sempa-launch via pdsh/ssh, 2 ranks, 6 steps: {seconds:.0f} s")
