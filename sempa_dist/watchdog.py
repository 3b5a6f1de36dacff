"""Which rank stopped? Heartbeats that name a dead or frozen rank: while the job runs, and when a
collective fails.

When one rank dies or hangs, the others block in their next collective until it fails (the peer's
socket closes) or times out (``deepspeed.timeout_s``). That error names no rank: gloo says "timed
out waiting for recv", NCCL's watchdog names the collective. So each rank runs a daemon thread that
touches ``<output_dir>/.heartbeat/rank-<N>`` every few seconds with its current step. The thread
keeps beating while its rank waits inside a collective (the wait releases the GIL), so after a
failure the ranks whose heartbeat went quiet are the dead or frozen ones. Checkpoints already live
on storage every node shares; the heartbeats sit next to them.

That after-the-fact check (`silent_ranks`, run by train.report_failure) needs a Python exception,
and under NCCL none comes. ProcessGroupNCCL's own watchdog thread, not the rank's main thread, finds
the failed or timed-out collective (its loop in torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp logs
"[Rank N] Watchdog caught collective operation timeout: WorkNCCL(...) ran for ... milliseconds
before timing out", or "NCCL error: remote process exited or there was a network error") and calls
``work.handleException(asyncErrorHandling_)``, which logs "To avoid data inconsistency, we are taking
the entire process down." and rethrows in that C++ thread: the process aborts. When it does so is the
ErrorHandlingMode enum of torch 2.13's ProcessGroupNCCL.hpp (TearDown = 1, SkipCleanUp = 3;
SHOULD_TEAR_DOWN is every mode but NoHandling and CleanUpOnly) and, in the docs
(pytorch.org/docs/stable/torch_nccl_environment_variables.html), TORCH_NCCL_ASYNC_ERROR_HANDLING:
"If set to 1, aborting NCCL communicator and tearing down process upon error ... By default, it is
set to 3" (tear down, communicator not aborted); slurm/nccl.env sets 1. torch.distributed's
`_set_pg_timeout` docstring says it of the timeout: "collectives will be aborted asynchronously and
the process will crash". So under NCCL a rank is named only if someone names it BEFORE torch's
watchdog fires: for a frozen rank that is the collective timeout; a killed rank's peers may see
NCCL's remote error, and abort, sooner than any heartbeat can go silent (torch exposes no hook there).

Hence the same thread also watches peers (`watched_ranks`: rank 0 every rank, every other rank only
rank 0, so rank 0 reads N-1 small files per beat and the others one: cheap on a shared filesystem at
64 ranks) and, once per silence, prints one line to stderr naming the silent peer, its last step,
the collective timeout still to come and where to resume. It watches for a change of the file, never
compares clocks: nodes' clocks may disagree. A rank that finishes cleanly removes its file (`close`);
a watched file that disappears is therefore a finished peer, not a dead one (a killed or frozen
process cannot remove it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sempa_dist.fileio import write_atomic

INTERVAL_S = 2.0
WINDOW_S = INTERVAL_S * 1.5  # a rank whose file did not change in this long is silent
# Silence a watcher reports while the job runs: well above the beat interval, and above what a shared
# filesystem may take to show a peer's write (it is shortened for short collective timeouts: see
# `silent_after_default`)
SILENT_AFTER_S = 30.0
SILENT_AFTER_ENV = "SEMPA_SILENT_AFTER_S"
# below this many beat intervals a live peer can look silent: with equal periods and some jitter, two
# consecutive reads of a peer's file may fall between the same two of its writes
MIN_SILENT_INTERVALS = 2.5


def heartbeat_dir(output_dir: str | Path) -> Path:
    """Where the ranks' heartbeat files live: beside the checkpoints, on storage every node shares."""
    return Path(output_dir) / ".heartbeat"


def watched_ranks(rank: int, world_size: int) -> list[int]:
    """The peers `rank` watches: rank 0 watches every other rank; every other rank watches rank 0 only
    (so a dead rank 0 is named too, without every rank reading every file on a shared filesystem)."""
    if world_size <= 1:
        return []
    return list(range(1, world_size)) if rank == 0 else [0]


def silent_after_default(timeout_s: float | None, interval_s: float = INTERVAL_S) -> float:
    """Seconds of silence after which a watched peer is reported: ``$SEMPA_SILENT_AFTER_S`` when set;
    otherwise SILENT_AFTER_S, shortened to a third of the collective timeout `timeout_s` (the line
    helps only if it comes before the timeout ends the job), but never under MIN_SILENT_INTERVALS
    beat intervals."""
    raw = os.environ.get(SILENT_AFTER_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not value > 0:  # also NaN
            raise ValueError(f"{SILENT_AFTER_ENV}={raw!r}: expected a number of seconds > 0")
        return value
    silent = SILENT_AFTER_S if timeout_s is None else min(SILENT_AFTER_S, timeout_s / 3)
    return max(silent, MIN_SILENT_INTERVALS * interval_s)


@dataclass
class _Peer:
    """What this rank's watcher knows of one peer's heartbeat file."""

    rank: int
    # the file's text when it last changed (None: no file), compared as text: a file left half-written
    # by a rank killed or frozen mid-write is unchanged, not "a write in progress", for ever
    text: str | None
    step: int | None  # the last step it reported (None: none read yet)
    changed_at: float  # time.monotonic() of the read that saw that change (or when watching began)
    seen: bool  # the file existed at some point: its disappearance is then a clean finish
    unchanged_reads: int = 0
    reported: bool = False


class Heartbeat:
    """Touches this rank's heartbeat file every `interval_s` with the step it is on, and watches its
    peers' files (`watched_ranks`), printing one line to stderr when one goes silent.

    `world_size`: 1 (the default) watches nobody. `silent_after_s`: None takes
    `silent_after_default(timeout_s, interval_s)`. `timeout_s`: the collective timeout, quoted in the
    line. `hint`: appended to the line (e.g. where to resume); a callable is called when the line is
    written, so it can name the checkpoint complete at that moment."""

    def __init__(self, output_dir: str | Path, rank: int, world_size: int = 1, interval_s: float = INTERVAL_S,
                 silent_after_s: float | None = None, timeout_s: float | None = None,
                 hint: str | Callable[[], str] | None = None) -> None:
        self.dir = heartbeat_dir(output_dir)
        self.path = self.dir / f"rank-{rank}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank, self.step, self.interval_s = rank, 0, interval_s
        if silent_after_s is None:
            silent_after_s = silent_after_default(timeout_s, interval_s)
        self.silent_after_s = silent_after_s
        self.timeout_s, self.hint = timeout_s, hint
        # counted in reads as well as seconds: if this process itself was suspended or starved of the
        # GIL, the first read after it would otherwise find every peer "silent" for that long
        self._reads_needed = max(1, math.ceil(self.silent_after_s / interval_s))
        self._stop = threading.Event()
        self._beat()
        now = time.monotonic()
        self._peers: list[_Peer] = []
        for r in watched_ranks(rank, world_size):
            text = _read_text(self._peer_path(r))
            text = None if text is _UNREADABLE else text
            self._peers.append(_Peer(r, text, _step_of(text), now, seen=text is not None))
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank-{rank}", daemon=True)
        self._thread.start()

    def _peer_path(self, rank: int) -> Path:
        return self.dir / f"rank-{rank}"

    def _beat(self) -> None:
        # written aside and renamed over (atomic, on a shared filesystem too): no reader ever sees half
        # a file, and a rank killed or frozen mid-write leaves its last whole beat behind
        write_atomic(self.path, json.dumps({"step": self.step, "time": time.time()}), durable=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):  # a full disk must not kill training from a side thread
                self._beat()
            # nor may a failed watch (stderr closed, a hint that raised) stop the beats: the peers would
            # then name this live rank
            with contextlib.suppress(Exception):
                self._watch(time.monotonic())

    def _watch(self, now: float) -> None:
        """One read of each watched peer's file; a line for each peer that just crossed the silence."""
        for peer in self._peers:
            text = _read_text(self._peer_path(peer.rank))
            if text is _UNREADABLE:  # e.g. a stale NFS handle: no evidence either way this time
                continue
            if text != peer.text:
                step = _step_of(text)
                peer.step = peer.step if step is None else step
                if peer.reported and text is not None:
                    _say(f"sempa-train: rank {peer.rank} is beating again (step {peer.step}; seen from rank "
                         f"{self.rank}): it was slow, not dead")
                peer.text, peer.changed_at, peer.unchanged_reads, peer.reported = text, now, 0, False
                peer.seen = peer.seen or text is not None
                continue
            if text is None and peer.seen:  # removed by its close(): it finished cleanly
                continue
            peer.unchanged_reads += 1
            if (not peer.reported and peer.unchanged_reads >= self._reads_needed
                    and now - peer.changed_at >= self.silent_after_s):
                peer.reported = True
                _say(self._silent_line(peer, now))

    def _silent_line(self, peer: _Peer, now: float) -> str:
        ago = now - peer.changed_at
        if peer.text is None:
            what = (f"rank {peer.rank} has written no heartbeat in the {ago:.0f} s rank {self.rank} has "
                    "watched for it: it died before its first beat, or never started")
        else:
            what = (f"rank {peer.rank} stopped beating {ago:.0f} s ago (last heartbeat at step "
                    f"{'?' if peer.step is None else peer.step}; seen from rank {self.rank}): dead or frozen")
        timeout = "" if self.timeout_s is None else f" (deepspeed.timeout_s={self.timeout_s:g})"
        line = (f"sempa-train: {what}; the other ranks fail in their next collective, at the latest when it "
                f"times out{timeout}")
        try:
            hint = self.hint() if callable(self.hint) else self.hint
        except Exception as e:  # the line without its hint beats no line
            hint = f"(resume hint failed: {type(e).__name__}: {e})"
        return f"{line}; {hint}" if hint else line

    def close(self) -> None:
        """Stop beating and watching, and remove this rank's file: to its watchers, a clean finish."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        self.path.unlink(missing_ok=True)


_UNREADABLE = "\0unreadable"  # what _read_text returns for an error other than a missing file


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return _UNREADABLE


def _step_of(text: str | None) -> int | None:
    try:
        return int(json.loads(text)["step"]) if text else None
    except (ValueError, KeyError, TypeError):
        return None


def _say(line: str) -> None:
    # looked up at each call, not bound at import: the stderr a test or a launcher installed
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Silent:
    rank: int
    step: int | None  # the step it last reported (None: it never beat)


def _read(path: Path) -> tuple[float, int] | None:
    try:
        beat = json.loads(path.read_text())
        return float(beat["time"]), int(beat["step"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError):
        return (-1.0, -1)  # caught mid-write: it is beating


def silent_ranks(output_dir: str | Path, world_size: int, window_s: float = WINDOW_S) -> list[Silent]:
    """Ranks whose heartbeat file did not change during a `window_s` wait (or does not exist).
    Watching for a change, not comparing clocks, keeps it right when nodes' clocks disagree."""
    paths = [heartbeat_dir(output_dir) / f"rank-{r}" for r in range(world_size)]
    before = [_read(p) for p in paths]
    time.sleep(window_s)
    silent = []
    for rank, (b, p) in enumerate(zip(before, paths, strict=True)):
        after = _read(p)
        if after is None or (b is not None and after == b and b[0] >= 0):
            silent.append(Silent(rank, None if after is None else after[1]))
    return silent


def describe_silent(silent: list[Silent], window_s: float = WINDOW_S) -> str:
    """One line for the failure message."""
    if not silent:
        return "every rank's heartbeat is still beating (no rank died or froze)"
    parts = [f"rank {s.rank} (no heartbeat)" if s.step is None
             else f"rank {s.rank} (last heartbeat at step {s.step})" for s in silent]
    return f"not responding (no heartbeat for {window_s:.0f} s): " + ", ".join(parts)
