"""What MLflow tracking costs the training loop per step: `log_metrics` with the loop's 10 metrics,
timed call by call, side by side for

- `NullTracker` (tracking off, and every rank but 0): the floor;
- `Tracker` into a live sqlite store (the default embedded store);
- `Tracker` into a dead server (connection refused: values spill to mlflow_pending.jsonl);
- `Tracker` into a stuck store (log_batch blocks until the run ends: a hung server).

The loop's cost is the queueing alone; the sender thread does the sending. `finish s` is the time
the end of the run takes (last flush, and for the dead server the local fallback store). This was
an assertion in tests/test_tracking.py (`per_step_ms < 5`); a clock on a busy machine proves little
there, so the tests assert the mechanism (tests/tracking/test_tracker.py) and this script measures.

    python bench/tracking_overhead.py [--steps 2000] [--out bench/tracking_overhead.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cell import REPO  # also puts this checkout on sys.path for the sempa_dist import

from sempa_dist.config import TrackingConfig
from sempa_dist.distributed import free_port
from sempa_dist.tracking import NullTracker, Tracker, open_client

# what the loop logs each step (sempa_dist/train.py's row)
NAMES = ["loss", "rewards/accuracy", "rewards/margin", "lr", "grad_norm", "tokens_per_s", "step_time_s",
         "logps/chosen", "logps/rejected", "peak_rss_mb"]
WARMUP = 50


def time_steps(tracker: NullTracker, steps: int) -> list[float]:
    """Microseconds of each `log_metrics` call over `steps` steps (after a warm-up)."""
    for step in range(1, WARMUP + 1):
        tracker.log_metrics({name: 1.0 / step for name in NAMES}, step)
    times = []
    for step in range(WARMUP + 1, WARMUP + steps + 1):
        row = {name: 1.0 / step for name in NAMES}
        t0 = time.perf_counter_ns()
        tracker.log_metrics(row, step)
        times.append((time.perf_counter_ns() - t0) / 1000)
    return times


def stuck(tracker: Tracker) -> threading.Event:
    """Make the store hang inside log_batch until the returned event is set."""
    release = threading.Event()
    send = tracker._client.log_batch

    def hanging(*args: Any, **kwargs: Any) -> Any:
        release.wait()
        return send(*args, **kwargs)

    tracker._client.log_batch = hanging
    return release


def case(name: str, root: Path, steps: int, flush_every_s: float) -> dict[str, Any]:
    """One row: build the tracker, time the loop's calls, end the run, check what arrived."""
    store = "sqlite:///" + str(root / "mlflow.db")
    release = None
    if name == "NullTracker":
        tracker: NullTracker = NullTracker()
    elif name == "dead server":
        tracker = Tracker(f"http://127.0.0.1:{free_port()}", "bench", root / "dead", run_name="dead",
                          flush_every_s=flush_every_s)
    else:
        tracker = Tracker(store, "bench", root / name.replace(" ", "_"), run_name=name, flush_every_s=flush_every_s)
        assert tracker.flush(), "the sqlite store did not connect"  # connected before the clock starts
        if name == "stuck store":
            release = stuck(tracker)
    times = time_steps(tracker, steps)
    if release is not None:
        release.set()
    t0 = time.perf_counter()
    tracker.finish()
    finish_s = time.perf_counter() - t0
    arrived = None
    if isinstance(tracker, Tracker) and tracker.uri == store:
        arrived = len(open_client(store).get_metric_history(tracker.run_id, "loss"))
    q = statistics.quantiles(times, n=100)
    return {"tracker": name, "steps": steps, "mean_us": statistics.fmean(times), "p50_us": q[49], "p99_us": q[98],
            "max_us": max(times), "finish_s": finish_s,
            "loss_values_in_store": arrived, "expected": WARMUP + steps if arrived is not None else None}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    head = "| tracker | steps | mean µs/step | p50 µs | p99 µs | max µs | finish s | loss values in store |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        arrived = "-" if r["loss_values_in_store"] is None else f"{r['loss_values_in_store']} / {r['expected']}"
        lines.append(f"| {r['tracker']} | {r['steps']} | {r['mean_us']:.1f} | {r['p50_us']:.1f} | {r['p99_us']:.1f} "
                     f"| {r['max_us']:.0f} | {r['finish_s']:.2f} | {arrived} |")
    return "\n".join(lines)


def main() -> None:
    """Run every case in one process, one after another, and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="timed steps per tracker (10 metrics each)")
    ap.add_argument("--flush-every-s", type=float, default=TrackingConfig.flush_every_s,
                    help="tracking.flush_every_s (default: the config's)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("NullTracker", "sqlite store", "dead server", "stuck store"):
            notes = io.StringIO()  # the tracker's warnings and notes (dead server), not the table's business
            with contextlib.redirect_stderr(notes):
                rows.append(case(name, Path(tmp), a.steps, a.flush_every_s))
            print(f"{name}: done", flush=True)
    print(f"\nlog_metrics with {len(NAMES)} metrics a step, flush_every_s={a.flush_every_s}; checkout {REPO}\n")
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
