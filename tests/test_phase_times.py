import time

import torch

from sempa_dist.phase_times import PHASES, PhaseTimer, phase_timing_enabled


def test_auto_times_phases_on_cpu_only():
    assert phase_timing_enabled("auto", torch.device("cpu"))
    assert not phase_timing_enabled("auto", torch.device("cuda", 0))
    assert phase_timing_enabled("on", torch.device("cuda", 0))
    assert not phase_timing_enabled("off", torch.device("cpu"))


def test_phases_accumulate_over_micro_steps_and_skip_unmarked_work():
    timer = PhaseTimer(True, torch.device("cpu"))
    timer.start()
    for _ in range(2):  # two micro-steps
        timer.resume()
        time.sleep(0.02)
        timer.mark("policy_forward")
        time.sleep(0.01)
        timer.mark("backward")
        time.sleep(0.05)  # metric bookkeeping between micro-steps: no phase's
    timer.resume()
    timer.mark("optimizer")
    s = timer.seconds()
    assert set(s) == {f"time/{p}_s" for p in PHASES}
    assert 0.04 <= s["time/policy_forward_s"] < 0.09 and 0.02 <= s["time/backward_s"] < 0.05
    assert s["time/reference_s"] == 0.0 and s["time/optimizer_s"] < 0.01
    timer.start()  # a new step starts from zero
    assert all(v == 0.0 for v in timer.seconds().values())


def test_a_disabled_timer_reports_nothing():
    timer = PhaseTimer(False, torch.device("cpu"))
    timer.start()
    timer.mark("backward")
    assert timer.seconds() == {}
