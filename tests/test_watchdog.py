"""The heartbeat thread names a dead or frozen peer while the job runs (what an NCCL user sees before
torch's watchdog aborts every rank at the collective timeout): real Heartbeat threads and real peer
processes that are SIGKILLed or SIGSTOPped, short intervals.

The end-to-end check with the trainer is in tests/test_faults.py (the frozen-rank test).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sempa_dist.watchdog import (
    MIN_SILENT_INTERVALS,
    SILENT_AFTER_ENV,
    SILENT_AFTER_S,
    Heartbeat,
    _read,
    heartbeat_dir,
    silent_after_default,
    watched_ranks,
)
from tests.distributed import REPO, child_env

INTERVAL_S = 0.25
SILENT_S = 1.5  # 6 beats: a live peer never looks silent this long, even on a busy machine
STEP = 7
# a peer rank in a process of its own: beats (and watches) until it is killed or stopped
PEER = f"""
import sys, time
from sempa_dist.watchdog import Heartbeat
hb = Heartbeat(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), interval_s={INTERVAL_S}, silent_after_s={SILENT_S})
hb.step = {STEP}
time.sleep(120)
"""


class Stderr:
    """This process's stderr as captured by capfd, accumulated across reads."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd, self.text = capfd, ""

    def read(self) -> str:
        self.text += self.capfd.readouterr().err
        return self.text

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds until `pattern` appears (fails after `timeout`)."""
        t0 = time.monotonic()
        while not re.search(pattern, self.read()):
            assert time.monotonic() - t0 < timeout, f"no {pattern!r} within {timeout} s:\n{self.text}"
            time.sleep(0.05)
        return time.monotonic() - t0

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.read()))


@pytest.fixture
def stderr(capfd) -> Stderr:
    return Stderr(capfd)


@pytest.fixture
def heartbeats() -> Iterator[list[Heartbeat]]:
    """In-process Heartbeats a test starts; closed at the end whatever happens."""
    started: list[Heartbeat] = []
    yield started
    for hb in started:
        hb.close()


def heartbeat(started: list[Heartbeat], out: Path, rank: int, world: int, **kw) -> Heartbeat:
    hb = Heartbeat(out, rank, world, interval_s=INTERVAL_S, silent_after_s=SILENT_S, **kw)
    started.append(hb)
    return hb


@pytest.fixture
def peer(tmp_path) -> Iterator:
    """start(rank, world): a peer rank in its own process, beating at step STEP; killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(rank: int, world: int) -> subprocess.Popen:
        # its stderr to a file, not ours: its own watcher's lines must not count as this process's
        with open(tmp_path / f"peer-{rank}.err", "w") as err:
            p = subprocess.Popen([sys.executable, "-c", PEER, str(tmp_path), str(rank), str(world)], cwd=REPO,
                                 env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        procs.append(p)
        path, deadline = heartbeat_dir(tmp_path) / f"rank-{rank}", time.monotonic() + 30
        while (beat := _read(path)) is None or beat[1] != STEP:  # it has beaten at STEP
            assert p.poll() is None, (tmp_path / f"peer-{rank}.err").read_text()
            assert time.monotonic() < deadline, "the peer did not beat"
            time.sleep(0.05)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait()


def silent_line(dead: int, watcher: int) -> str:
    return (rf"sempa-train: rank {dead} stopped beating \d+ s ago \(last heartbeat at step {STEP}; "
            rf"seen from rank {watcher}\): dead or frozen")


def test_watched_ranks_rank0_watches_everyone_the_others_rank0():
    assert watched_ranks(0, 1) == [] and watched_ranks(0, 2) == [1]
    assert watched_ranks(0, 64) == list(range(1, 64))
    assert watched_ranks(5, 64) == [0] and watched_ranks(1, 2) == [0]


def test_silent_after_default_env_and_timeout(monkeypatch):
    monkeypatch.delenv(SILENT_AFTER_ENV, raising=False)
    assert silent_after_default(None) == SILENT_AFTER_S == silent_after_default(1800)
    assert silent_after_default(60) == 20  # a third of a short collective timeout: the line comes first
    assert silent_after_default(6, interval_s=2.0) == MIN_SILENT_INTERVALS * 2.0  # never near the beat
    monkeypatch.setenv(SILENT_AFTER_ENV, "4.5")
    assert silent_after_default(1800) == 4.5
    monkeypatch.setenv(SILENT_AFTER_ENV, "soon")
    with pytest.raises(ValueError, match=SILENT_AFTER_ENV):
        silent_after_default(1800)


def test_rank0_names_a_killed_rank_once_and_not_the_live_ones(tmp_path, stderr, heartbeats, peer):
    """World of 3: rank 1 (its own process) is SIGKILLed; rank 0 names it, once, within the silence
    window plus a beat or two, with the timeout and the resume hint; the live ranks 0 and 2 are never
    named (rank 2 watches rank 0 only)."""
    heartbeat(heartbeats, tmp_path, 0, 3, timeout_s=60, hint=lambda: "resume: step 6 (train.resume=auto)")
    heartbeat(heartbeats, tmp_path, 2, 3)
    victim = peer(1, 3)
    time.sleep(1.5 * SILENT_S)  # all beating: nothing to say
    assert stderr.count("sempa-train") == 0, stderr.text
    victim.kill()
    victim.wait()
    waited = stderr.wait_for(silent_line(1, 0), timeout=SILENT_S + 6 * INTERVAL_S + 2)
    assert waited >= SILENT_S - 2 * INTERVAL_S, waited  # not before it could have gone silent
    line = next(ln for ln in stderr.text.splitlines() if "stopped beating" in ln)
    assert line.endswith("at the latest when it times out (deepspeed.timeout_s=60); "
                         "resume: step 6 (train.resume=auto)"), line
    time.sleep(1.5 * SILENT_S)
    assert stderr.count("stopped beating") == 1, stderr.text  # once per silence, not once per beat
    assert stderr.count(r"rank [02] stopped") == 0 and stderr.count("no heartbeat") == 0, stderr.text


def test_a_dead_rank0_is_named_by_the_other_ranks(tmp_path, stderr, heartbeats, peer):
    """Rank 0 (its own process) is SIGKILLed: ranks 1 and 2, which watch rank 0 only, each name it once."""
    heartbeat(heartbeats, tmp_path, 1, 3)
    heartbeat(heartbeats, tmp_path, 2, 3)
    victim = peer(0, 3)
    victim.kill()
    victim.wait()
    stderr.wait_for(silent_line(0, 1), timeout=SILENT_S + 6 * INTERVAL_S + 2)
    stderr.wait_for(silent_line(0, 2), timeout=2 * INTERVAL_S + 2)
    time.sleep(SILENT_S)
    assert stderr.count("stopped beating") == 2, stderr.text


def test_a_frozen_rank_is_named_and_its_recovery_too(tmp_path, stderr, heartbeats, peer):
    """SIGSTOP (a frozen rank, or one stalled long enough to look so): named; after SIGCONT, rank 0
    says it beats again, and a second freeze is named again."""
    heartbeat(heartbeats, tmp_path, 0, 2)
    frozen = peer(1, 2)
    frozen.send_signal(signal.SIGSTOP)
    stderr.wait_for(silent_line(1, 0), timeout=SILENT_S + 6 * INTERVAL_S + 2)
    frozen.send_signal(signal.SIGCONT)
    stderr.wait_for(rf"rank 1 is beating again \(step {STEP}; seen from rank 0\)", timeout=4 * INTERVAL_S + 2)
    frozen.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + SILENT_S + 6 * INTERVAL_S + 2
    while stderr.count("stopped beating") < 2:
        assert time.monotonic() < deadline, stderr.text
        time.sleep(0.05)


def test_a_rank_that_finishes_cleanly_is_not_reported(tmp_path, stderr, heartbeats):
    """close() removes the file: to its watchers a finished rank, never a dead one (both ways)."""
    hb0 = heartbeat(heartbeats, tmp_path, 0, 2)
    hb1 = heartbeat(heartbeats, tmp_path, 1, 2)
    time.sleep(3 * INTERVAL_S)  # rank 0 has read rank 1's file
    hb1.close()
    assert not hb1.path.exists()
    time.sleep(1.5 * SILENT_S)
    assert stderr.count("sempa-train") == 0, stderr.text
    hb1 = heartbeat(heartbeats, tmp_path, 1, 2)  # rank 0 finishing first: rank 1 says nothing either
    time.sleep(3 * INTERVAL_S)
    hb0.close()
    time.sleep(1.5 * SILENT_S)
    assert stderr.count("sempa-train") == 0, stderr.text


def test_a_rank_that_never_beats_is_named(tmp_path, stderr, heartbeats):
    heartbeat(heartbeats, tmp_path, 0, 2, hint="no checkpoint was completed")
    stderr.wait_for(r"(?m)sempa-train: rank 1 has written no heartbeat in the \d+ s rank 0 has watched for it: "
                    r"it died before its first beat, or never started; .*; no checkpoint was completed$",
                    timeout=SILENT_S + 6 * INTERVAL_S + 2)


def test_a_failing_hint_still_names_the_rank(tmp_path, stderr, heartbeats):
    def hint() -> str:
        raise OSError("checkpoints unreadable")

    hb0 = heartbeat(heartbeats, tmp_path, 0, 2, hint=hint)
    stderr.wait_for(r"rank 1 has written no heartbeat .*\(resume hint failed: OSError: checkpoints unreadable\)",
                    timeout=SILENT_S + 6 * INTERVAL_S + 2)
    assert hb0._thread.is_alive()  # and it still beats


def test_a_file_left_half_written_is_silence_not_a_write_in_progress(tmp_path, stderr, heartbeats):
    """A rank killed or frozen in the middle of writing its beat (possible before beats were renamed
    into place, and on any filesystem that tears writes): the unchanged half file is silence."""
    heartbeat_dir(tmp_path).mkdir(parents=True)
    (heartbeat_dir(tmp_path) / "rank-1").write_text('{"step": 4, "ti')
    heartbeat(heartbeats, tmp_path, 0, 2)
    stderr.wait_for(r"rank 1 stopped beating \d+ s ago \(last heartbeat at step \?; seen from rank 0\)",
                    timeout=SILENT_S + 6 * INTERVAL_S + 2)
