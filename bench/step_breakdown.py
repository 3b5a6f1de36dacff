"""Where a training step's time goes on one rank: compute vs DeepSpeed ZeRO-3's own work, from a py-spy profile.

    pip install py-spy
    sempa-train ... &                               # any run; let it pass its warm-up steps
    py-spy record --pid <rank 0's pid> --duration 50 --rate 40 --idle --format raw --output rank0.txt
    python bench/step_breakdown.py rank0.txt [--step-s 8.2]

py-spy's raw format is one line per distinct stack, ``frame;frame;... count``. Only the main thread's
samples count (its stacks start at the module entry point); ``--idle`` keeps the samples where it waits
(in a collective), which are part of the step. A sample is ZeRO-3's when any frame of its stack is in
DeepSpeed's parameter coordinator, partitioning, stage-3 optimizer or comm code; DeepSpeed's own linear
(``zero/linear.py``, the matmul itself) counts as compute. ``--step-s`` turns shares into seconds.
"""

from __future__ import annotations

import argparse
from collections import Counter

ZERO_FILES = ("parameter_offload.py", "partitioned_param_coordinator.py", "partition_parameters.py",
              "zero/stage3.py", "deepspeed/comm/", "coalesced_collectives.py", "zero/utils.py")
PHASES = (("reference", "EngineReference.logps"), ("backward", "DeepSpeedEngine.backward"),
          ("optimizer", "DeepSpeedEngine.step"), ("policy forward", "DeepSpeedEngine.forward"))


def main_thread_stacks(path: str) -> list[tuple[str, int]]:
    """(stack as py-spy wrote it, ``frame;frame;...``, sample count) of the main thread's stacks."""
    stacks = []
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if stack.startswith("_run_module_as_main"):  # the main thread; helper threads start elsewhere
                stacks.append((stack, int(count)))
    return stacks


def bucket(stack: str) -> str:
    """What a sample's time was spent on: compute, or which part of ZeRO-3's per-step work."""
    if not any(z in stack for z in ZERO_FILES):
        return "compute (and the rest)"
    if "DeepSpeedEngine.step" in stack:
        return "zero-3: optimizer step"
    if "fetch_sub_module" in stack:
        return "zero-3: parameter all-gather" + (" (waiting)" if ".wait " in stack else "")
    if "release_sub_module" in stack:
        return "zero-3: parameter release"
    if "reduce" in stack:
        return "zero-3: gradient reduce"
    return "zero-3: other module hooks"


def phase(stack: str) -> str:
    return next((name for name, marker in PHASES if marker in stack), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="py-spy record --format raw output")
    ap.add_argument("--step-s", type=float, help="median step time of the profiled run, to print seconds")
    a = ap.parse_args()
    stacks = main_thread_stacks(a.profile)
    total = sum(n for _, n in stacks)
    if not total:
        raise SystemExit(f"{a.profile}: no main-thread samples (was it recorded with --format raw?)")
    by_bucket, by_phase = Counter(), Counter()
    for stack, n in stacks:
        b = bucket(stack)
        by_bucket[b] += n
        if b.startswith("zero-3"):
            by_phase[phase(stack)] += n
    sec = (lambda n: f" | {a.step_s * n / total:.2f}") if a.step_s else (lambda n: "")
    head, rule = (" | seconds a step", "|---|---|---|") if a.step_s else ("", "|---|---|")
    print(f"{total} main-thread samples\n\n| where | share{head} |\n{rule}")
    for name, n in by_bucket.most_common():
        print(f"| {name} | {100 * n / total:.1f} %{sec(n)} |")
    zero = sum(n for b, n in by_bucket.items() if b.startswith("zero-3"))
    print(f"| **zero-3 in all** | **{100 * zero / total:.1f} %**{sec(zero)} |")
    print(f"\n| ZeRO-3's share, by phase | share{head} |\n{rule}")
    for name, n in by_phase.most_common():
        print(f"| {name} | {100 * n / total:.1f} %{sec(n)} |")


if __name__ == "__main__":
    main()
