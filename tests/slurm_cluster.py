"""A real two-node Slurm cluster on this one machine, for tests that submit the batch scripts in slurm/.

`running_cluster(root)` writes slurm.conf (every state, spool, log and pid path under `root`), starts a
private munged, slurmctld and one slurmd per node (all in the foreground, so their PIDs are ours),
waits until `sinfo` shows every node idle and yields a `SlurmCluster`. Teardown stops the daemons by
those PIDs, never by name: other work on the machine may run its own Slurm.

Layout (measured recipe, Slurm 22.05 from Debian): several slurmd on one host are allowed with
``NodeName=nX NodeHostname=<hostname -s> NodeAddr=127.0.0.1 Port=<own port>`` and ``slurmd -N nX``;
proctrack/linuxproc + task/none need no cgroups. Node names do not resolve, which is also what a
batch script must cope with on clusters whose node names are not in DNS (it takes NodeAddr then).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo", "squeue", "srun", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def missing_reason() -> str | None:
    """Why a local cluster cannot start here (None when it can): the tests skip with this text."""
    absent = [name for name in DAEMONS if shutil.which(name) is None]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)} missing; scripts/system_deps.sh installs them)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as SlurmdUser=root)"
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together so the kernel cannot hand one out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmCluster:
    """Handle on a running local cluster: its environment (SLURM_CONF) and command helpers."""

    root: Path
    nodes: list[str]
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def cmd(self, *args: str, timeout: float = 30, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster (`env` adds to the cluster's environment)."""
        proc = subprocess.run(list(args), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit from `cwd` (the job's SLURM_SUBMIT_DIR); returns the job id."""
        out = self.cmd("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def sbatch_wait(self, *args: str, env: dict | None = None, cwd: Path | None = None,
                    timeout: float = 600) -> subprocess.CompletedProcess:
        """`sbatch --wait`: returns when the job ended for good (it waits through requeues) with the
        batch script's exit code. It polls slowly (up to 10 s and more between polls): `sbatch` +
        `wait_job` is faster where a test needs speed or has to act while the job runs."""
        return self.cmd("sbatch", "--wait", *args, env=env, cwd=cwd, timeout=timeout, check=False)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.cmd("scontrol", *args, check=check)

    def squeue(self, *args: str) -> str:
        return self.cmd("squeue", "--noheader", *args).stdout

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, RestartCnt, NodeList, ExitCode, ...)."""
        line = self.scontrol("show", "job", "-o", str(job_id)).stdout.strip()
        return dict(m.groups() for m in re.finditer(r"(\w[\w:/]*)=(\S*)", line))

    def wait_job(self, job_id: int, timeout: float, until: set[str] | None = None, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job's state is in `until` (default: a terminal state); returns the job record."""
        until = until or TERMINAL_STATES
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout}s: {info}")
            time.sleep(poll)

    def node_states(self) -> dict[str, str]:
        out = self.cmd("sinfo", "--noheader", "-N", "-o", "%N %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def logs(self) -> str:
        """Tail of every daemon log: what a failing test prints."""
        parts = []
        for log in sorted(self.root.glob("log/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-25:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def cancel_all(self, timeout: float = 90) -> None:
        """Cancel every job and wait until its step daemons are gone (slurmstepd outlives slurmd)."""
        if self.procs.get("slurmctld") is None or self.procs["slurmctld"].poll() is not None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if not self.squeue().strip():
                return
            self.cmd("scancel", f"--user={os.getuid()}")  # every job of this private cluster is ours
            deadline = time.monotonic() + timeout
            while (self.squeue().strip() or self.step_sockets()) and time.monotonic() < deadline:
                time.sleep(0.5)

    def step_sockets(self) -> list[Path]:
        """One socket `<node>_<job>.<step>` per live slurmstepd in its node's spool directory."""
        return [p for n in self.nodes for p in (self.root / "spool" / n).glob(f"{n}_*")]

    def stop(self) -> None:
        """Cancel leftover jobs, then stop every daemon we started, by PID: SIGTERM, then SIGKILL after 10 s."""
        self.cancel_all()
        for proc in reversed(list(self.procs.values())):  # slurmd before slurmctld before munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def write_config(root: Path, nodes: list[str], cpus: int, kill_wait: int) -> Path:
    """slurm.conf with everything under `root`; returns its path."""
    for sub in ("state", "log", "run", "munge", *(f"spool/{n}" for n in nodes)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]  # slurmd -N checks NodeHostname against this
    ctld_port, *node_ports = _free_ports(1 + len(nodes))
    lines = [
        "ClusterName=sempatest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire: slurmctld holds a requeued batch job back for cred_expire + 1 s (default 120 s,
        # so a stale credential of the old run cannot be replayed); 5 s keeps the requeue test short
        f"AuthInfo=socket={root}/munge/munge.socket,cred_expire=5",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        # a requeued job becomes eligible by time passing, which only the periodic pass notices
        # (default every 60 s): every 2 s here
        "SchedulerParameters=sched_interval=2",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "ReturnToService=2",
        "JobRequeue=1",
        # the time a SIGTERMed job (scancel, scontrol requeue) has to checkpoint before SIGKILL
        f"KillWait={kill_wait}",
        "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` for the assertions
        "SlurmdTimeout=60",
        "InactiveLimit=0",
    ]
    for name, port in zip(nodes, node_ports, strict=True):
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start_munged(root: Path) -> subprocess.Popen:
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o700)  # munged refuses a socket directory others can write to
    cmd = ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
           f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
           f"--seed-file={root}/munge/munged.seed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 15
    while not (root / "munge" / "munge.socket").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"munged did not start: {(root / 'log' / 'munged.log').read_text(errors='replace')}")
        time.sleep(0.1)
    return proc


@contextlib.contextmanager
def running_cluster(root: Path, n_nodes: int = 2, cpus: int | None = None, kill_wait: int = 60,
                    start_timeout: float = 60) -> Iterator[SlurmCluster]:
    """Start munged + slurmctld + one slurmd per node under `root`; stop them all on exit."""
    nodes = [f"n{i + 1}" for i in range(n_nodes)]
    conf = write_config(root, nodes, cpus or os.cpu_count() or 1, kill_wait)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # never a job's env of the caller
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root, nodes, env)
    try:
        cluster.procs["munged"] = _start_munged(root)
        # -D: foreground, so the PID we hold is the daemon's; -i: ignore (absent) saved state
        cluster.procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i"], env=env, stdout=subprocess.DEVNULL,
                                                      stderr=subprocess.DEVNULL, start_new_session=True)
        for name in nodes:
            cluster.procs[f"slurmd-{name}"] = subprocess.Popen(
                ["slurmd", "-D", "-N", name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while True:
            dead = [name for name, p in cluster.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited at start\n{cluster.logs()}")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                states = cluster.node_states()
                if len(states) == n_nodes and all(s == "idle" for s in states.values()):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {start_timeout}s\n{cluster.logs()}")
            time.sleep(0.3)
        yield cluster
    finally:
        cluster.stop()
