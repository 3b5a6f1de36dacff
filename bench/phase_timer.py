"""How closely PhaseTimer's per-phase seconds follow known sleeps, and what one mark() costs.

The wall-clock side of tests/test_phase_times.py (which checks the bookkeeping on a fake clock): two
micro-steps of sleeps per phase with unmarked sleeps between them, repeated; per phase the requested
seconds, the median measured, the worst excess. Then the cost of one mark() (no device sync on CPU).
Times depend on the machine and its load: a table to read, no pass/fail.

    python bench/phase_timer.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cell  # noqa: F401 - puts this checkout on sys.path for the sempa_dist import
import torch

from sempa_dist.phase_times import PhaseTimer, metric_name

# one micro-step: (phase, seconds slept before its mark); the step has two, then the optimizer
MICRO = (("policy_forward", 0.02), ("reference", 0.005), ("backward", 0.01))
UNMARKED_S = 0.05  # between micro-steps: bookkeeping that belongs to no phase
OPTIMIZER_S = 0.0


def one_step(timer: PhaseTimer) -> dict[str, float]:
    timer.start()
    for _ in range(2):
        timer.resume()
        for phase, seconds in MICRO:
            time.sleep(seconds)
            timer.mark(phase)
        time.sleep(UNMARKED_S)
    timer.resume()
    time.sleep(OPTIMIZER_S)
    timer.mark("optimizer")
    return timer.seconds()


def mark_cost_us(n: int = 100_000) -> float:
    timer = PhaseTimer(True, torch.device("cpu"))
    timer.start()
    t0 = time.perf_counter()
    for _ in range(n):
        timer.mark("backward")
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    timer = PhaseTimer(True, torch.device("cpu"))
    steps = [one_step(timer) for _ in range(args.repeats)]
    requested = {**{p: 2 * s for p, s in MICRO}, "optimizer": OPTIMIZER_S}
    rows = []
    for phase, want in requested.items():
        got = [s[metric_name(phase)] for s in steps]
        rows.append({"phase": phase, "requested_s": want, "median_s": statistics.median(got),
                     "max_excess_ms": max(g - want for g in got) * 1e3})
    cost = mark_cost_us()

    print(f"PhaseTimer vs sleeps: 2 micro-steps, {UNMARKED_S * 1e3:.0f} ms unmarked between them, "
          f"{args.repeats} steps")
    print(f"{'phase':<16} {'requested s':>12} {'median s':>10} {'max excess ms':>14}")
    for r in rows:
        print(f"{r['phase']:<16} {r['requested_s']:>12.3f} {r['median_s']:>10.4f} {r['max_excess_ms']:>14.2f}")
    print(f"one mark() on CPU: {cost:.2f} us")
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "phases": rows, "mark_us": cost}, indent=1) + "\n")


if __name__ == "__main__":
    main()
