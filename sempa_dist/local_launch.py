"""The ranks of `sempa-train train.nproc=N` on one machine: started, watched and stopped here.

Why not torchrun on one machine: its agent serves the rendezvous TCPStore on every interface
(c10d binds ``::`` whatever address it is given), so a laptop run would listen on the network.
Here the store is served from a socket this process binds to 127.0.0.1 (TCPStore's
``master_listen_fd``), the ranks join it as clients (``TORCHELASTIC_USE_AGENT_STORE``) and gloo
binds the loopback interface. Multi-node runs keep torchrun (slurm/train_8x8.sh) or the deepspeed
launcher (sempa-launch), where listening on the network is the point.

What torchrun's agent did for us is done here: signals (TERM, USR1, INT, HUP) are passed to every
rank, which checkpoint and exit 75 (preemption); when a rank fails, the others are stopped (TERM,
then KILL after a grace period) and the first failure is reported by rank, pid and exit code or
signal.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from sempa_dist.preemption import PREEMPTED_EXIT_CODE

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@dataclass
class Failure:
    rank: int
    pid: int
    returncode: int

    def __str__(self) -> str:
        if self.returncode < 0:
            how = f"was killed by {signal.Signals(-self.returncode).name}"
        else:
            how = f"exited with code {self.returncode}"
        return f"rank {self.rank} (pid {self.pid}) {how}"


def loopback_store(timeout_s: float):
    """A TCPStore served on 127.0.0.1 only, on a free port: (store, port). Keep the store alive."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.detach())
    return store, port


def run_ranks(cmd: list[str], nproc: int, env: dict[str, str], failure_grace_s: float = 10.0,
              store_timeout_s: float = 1800) -> tuple[int, Failure | None]:
    """Run `cmd` as ranks 0..nproc-1 of one job; return (exit code for the caller, first failure).

    The exit code is 0 when every rank exited 0, 75 when the ranks stopped for a preemption
    (every rank exited 75 or 0), else 1."""
    store, port = loopback_store(store_timeout_s)
    base = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), TORCHELASTIC_USE_AGENT_STORE="True")
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs: list[subprocess.Popen] = []

    def forward(signum: int, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    failure: Failure | None = None
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(cmd, env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank))))
        stop_deadline: float | None = None
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                rc = p.poll()
                # 75: this rank checkpointed for a preemption, and every rank stops at the same step
                if failure is None and rc not in (None, 0, PREEMPTED_EXIT_CODE):
                    failure = Failure(rank, p.pid, rc)
                    print(f"sempa-train: {failure}; stopping the other ranks", file=sys.stderr, flush=True)
                    for q in procs:
                        if q.poll() is None:
                            with contextlib.suppress(ProcessLookupError):
                                q.terminate()
                    stop_deadline = time.monotonic() + failure_grace_s
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                for q in procs:
                    if q.poll() is None:
                        q.kill()  # frozen, or still waiting in a collective with the failed rank
                stop_deadline = None
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)
        del store
    codes = [p.returncode for p in procs]
    if failure is None and all(c == 0 for c in codes):
        return 0, None
    if failure is None and all(c in (0, PREEMPTED_EXIT_CODE) for c in codes):
        return PREEMPTED_EXIT_CODE, None
    if failure is None:  # exit 75 from some and an error from others after a signal
        rank, p = next((r, p) for r, p in enumerate(procs) if p.returncode not in (0, PREEMPTED_EXIT_CODE))
        failure = Failure(rank, p.pid, p.returncode)
    return 1, failure
