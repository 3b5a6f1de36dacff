"""Wall time of the phases of one optimizer step: policy forward, reference log-probs, backward, optimizer.

The step's total hides where time goes; per-phase times show it (for instance that a ZeRO-3 engine's
weight gathers over gloo make its forward cost more than the tokens it computes). On a GPU kernels run
asynchronously, so a phase boundary must synchronise the device to be meaningful, which removes some
overlap: `train.phase_times` auto times phases only where ops already run synchronously (CPU).
"""

from __future__ import annotations

import time

import torch

PHASES = ("policy_forward", "reference", "backward", "optimizer")


def metric_name(phase: str) -> str:
    """The metrics-row key of a phase's seconds: time/<phase>_s."""
    return f"time/{phase}_s"


def phase_timing_enabled(setting: str, device: torch.device) -> bool:
    """`train.phase_times`: on, off, or auto (on where timing costs nothing: a CPU device)."""
    return setting == "on" or (setting == "auto" and device.type == "cpu")


class PhaseTimer:
    """Accumulates seconds per phase over a step's micro-steps: `start()`, then `mark(phase)` at the end
    of each phase; `seconds()` gives the totals. A disabled timer does nothing and reports nothing."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self._sync = enabled and device.type == "cuda"
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        """Begin a step: totals back to zero, the clock at the first phase's start."""
        if self.enabled:
            self._totals = dict.fromkeys(PHASES, 0.0)
            self._t = self._now()

    def resume(self) -> None:
        """Restart the clock after work that belongs to no phase (building the next micro-batch)."""
        if self.enabled:
            self._t = self._now()

    def mark(self, phase: str) -> None:
        """The phase `phase` ends now: add the time since the last mark (or start/resume) to it."""
        if self.enabled:
            t = self._now()
            self._totals[phase] += t - self._t
            self._t = t

    def seconds(self) -> dict[str, float]:
        """{"time/<phase>_s": seconds} for this step; empty when disabled."""
        return {metric_name(p): s for p, s in self._totals.items()} if self.enabled else {}
