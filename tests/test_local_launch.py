"""sempa_dist/local_launch.py with tiny rank programs: exit codes, the first failure, fast stop, and
a rendezvous store that answers on 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
import sys
import time

import psutil
import pytest

from sempa_dist.local_launch import loopback_store, run_ranks
from sempa_dist.preemption import PREEMPTED_EXIT_CODE


def ranks_running(body: str) -> list[str]:
    """A rank program: `body` runs with `rank` set from the environment the launcher gives."""
    return [sys.executable, "-c", f"import os, sys, time\nrank = int(os.environ['RANK'])\n{body}"]


def test_all_ranks_succeed_with_their_own_rank_and_a_loopback_master():
    body = ("assert os.environ['MASTER_ADDR'] == '127.0.0.1' and os.environ['WORLD_SIZE'] == '3'\n"
            "assert os.environ['LOCAL_RANK'] == str(rank)\n")
    assert run_ranks(ranks_running(body), 3, dict(os.environ)) == (0, None)


def test_preempted_ranks_give_75():
    rc, failure = run_ranks(ranks_running(f"sys.exit({PREEMPTED_EXIT_CODE} if rank == 0 else 0)"), 2, dict(os.environ))
    assert (rc, failure) == (PREEMPTED_EXIT_CODE, None)


def test_first_failure_is_named_and_the_others_are_stopped_fast():
    # rank 1 fails at once; rank 0 would sleep for a minute and ignores SIGTERM (as a rank stuck in a
    # collective does), so it is killed after the grace period
    body = ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "if rank == 1: sys.exit(3)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    rc, failure = run_ranks(ranks_running(body), 2, dict(os.environ), failure_grace_s=1.0)
    assert time.monotonic() - t0 < 10
    assert rc == 1 and failure is not None and (failure.rank, failure.returncode) == (1, 3)
    assert str(failure).startswith("rank 1 (pid ") and str(failure).endswith("exited with code 3")


def test_store_listens_on_loopback_only():
    store, port = loopback_store(timeout_s=5)
    store.set("k", "v")
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    other = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET and not a.address.startswith("127.")]
    if not other:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(OSError), socket.create_connection((other[0], port), timeout=2):
        pass
