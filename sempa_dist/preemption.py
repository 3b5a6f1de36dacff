"""Preemption: a signal asks for a checkpoint at the next step boundary, then a distinct exit code.

Slurm sends SIGUSR1 (``--signal=B:USR1@180``, forwarded by the batch script) or SIGTERM (scancel,
node drain, the time limit's grace period) to every task. The handler only sets a flag; the training
loop all-reduces it with the step's metrics so every rank agrees on the step where it stops, saves a
checkpoint there (a collective) and exits with ``PREEMPTED_EXIT_CODE``, which the Slurm script turns
into a requeue. ``resume: auto`` continues from that checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType

# EX_TEMPFAIL (sysexits.h): "try again later": the batch script requeues on it
PREEMPTED_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is on disk; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class PreemptionFlag:
    """Installs handlers for SIGTERM and SIGUSR1 that record the request; `restore()` puts the old ones back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS) -> None:
        self.requested: signal.Signals | None = None
        self._previous = {}
        for sig in signals:
            # outside the main thread (a test runner's thread) handlers cannot be set: run without them
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
