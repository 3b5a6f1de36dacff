"""PhaseTimer's bookkeeping, on a fake clock (no wall-clock claims: those are in bench/phase_timer.py)."""

import time

import pytest
import torch

from sempa_dist import phase_times
from sempa_dist.phase_times import PHASES, PhaseTimer, phase_timing_enabled


class FakeClock:
    """Stands in for the `time` module inside sempa_dist.phase_times: perf_counter() is what the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(phase_times, "time", fake)
    return fake


def test_auto_times_phases_on_cpu_only():
    assert phase_timing_enabled("auto", torch.device("cpu"))
    assert not phase_timing_enabled("auto", torch.device("cuda", 0))
    assert phase_timing_enabled("on", torch.device("cuda", 0))
    assert not phase_timing_enabled("off", torch.device("cpu"))


def test_phases_accumulate_over_micro_steps_and_skip_unmarked_work(clock):
    timer = PhaseTimer(True, torch.device("cpu"))
    clock.advance(7.0)  # before the step: no phase's
    timer.start()
    for _ in range(2):  # two micro-steps
        timer.resume()
        clock.advance(2.0)
        timer.mark("policy_forward")
        clock.advance(1.0)
        timer.mark("backward")
        clock.advance(5.0)  # metric bookkeeping between micro-steps: no phase's
    timer.resume()
    timer.mark("optimizer")
    # whole seconds on a clock at 1000: every sum is exact in floating point
    assert timer.seconds() == {"time/policy_forward_s": 4.0, "time/reference_s": 0.0, "time/backward_s": 2.0,
                               "time/optimizer_s": 0.0}
    assert set(timer.seconds()) == {f"time/{p}_s" for p in PHASES}
    timer.start()  # a new step starts from zero
    assert all(v == 0.0 for v in timer.seconds().values())


def test_each_phase_gets_the_time_since_the_previous_mark(clock):
    timer = PhaseTimer(True, torch.device("cpu"))
    timer.start()
    for phase, seconds in zip(PHASES, (3.0, 1.0, 4.0, 2.0), strict=True):
        clock.advance(seconds)
        timer.mark(phase)
    assert timer.seconds() == {"time/policy_forward_s": 3.0, "time/reference_s": 1.0, "time/backward_s": 4.0,
                               "time/optimizer_s": 2.0}


def test_real_clock_phases_are_non_negative_and_within_the_step():
    """On the real clock: every phase >= 0, and together no more than the wall time around the step
    (unmarked work in between is no phase's). No claim about how long anything took."""
    timer = PhaseTimer(True, torch.device("cpu"))
    t0 = time.perf_counter()
    timer.start()
    for phase in ("policy_forward", "reference", "backward"):
        sum(range(20_000))
        timer.mark(phase)
    sum(range(20_000))  # between phases
    timer.resume()
    timer.mark("optimizer")
    step = time.perf_counter() - t0
    s = timer.seconds()
    assert set(s) == {f"time/{p}_s" for p in PHASES}
    assert all(v >= 0.0 for v in s.values()), s
    assert sum(s.values()) <= step, (s, step)


def test_a_disabled_timer_reports_nothing(clock):
    timer = PhaseTimer(False, torch.device("cpu"))
    timer.start()
    clock.advance(1.0)
    timer.mark("backward")
    assert timer.seconds() == {}
    assert timer.seconds() == {}  # and keeps nothing between calls
