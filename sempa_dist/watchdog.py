"""Which rank stopped? Heartbeats that name a dead or hung rank when a collective fails.

When one rank dies or hangs, the others block in their next collective until it fails (the peer's
socket closes) or times out (``deepspeed.timeout_s``). That error names no rank: gloo says "timed
out waiting for recv", NCCL's watchdog names the collective. So each rank runs a daemon thread that
touches ``<output_dir>/.heartbeat/rank-<N>`` every few seconds with its current step. The thread
keeps beating while its rank waits inside a collective (the wait releases the GIL), so after a
failure the ranks whose heartbeat went quiet are the dead or frozen ones. Checkpoints already live
on storage every node shares; the heartbeats sit next to them.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

INTERVAL_S = 2.0
WINDOW_S = INTERVAL_S * 1.5  # a rank whose file did not change in this long is silent


def heartbeat_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / ".heartbeat"


class Heartbeat:
    """Touches this rank's heartbeat file every `interval_s` with the step it is on."""

    def __init__(self, output_dir: str | Path, rank: int, interval_s: float = INTERVAL_S) -> None:
        self.path = heartbeat_dir(output_dir) / f"rank-{rank}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step, self.interval_s = 0, interval_s
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank-{rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        # small enough to be written in one go; readers tolerate a torn read as "unknown"
        self.path.write_text(json.dumps({"step": self.step, "time": time.time()}))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):  # a full disk must not kill training from a side thread
                self._beat()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 1)
        self.path.unlink(missing_ok=True)


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
    parts = [f"rank {s.rank} (no heartbeat)" if s.step is None else f"rank {s.rank} (last heartbeat at step {s.step})"
             for s in silent]
    return f"not responding (no heartbeat for {window_s:.0f} s): " + ", ".join(parts)
