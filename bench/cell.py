"""One benchmark cell: a real `sempa-train` run, its per-step metrics read back (shared by the bench scripts)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

# this checkout; computed here rather than taken from sempa_dist.paths.REPO_ROOT because it is what
# puts sempa_dist on the path in the first place (the same directory once sempa_dist imports from it)
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the bench scripts import sempa_dist from this checkout, installed or not
    sys.path.insert(0, str(REPO))


def run_cell(config: str, out: Path, overrides: list[str]) -> list[dict] | list[str]:
    """Train `config` into `out` with `overrides` (no checkpoints, export or tracking: the steps
    alone are measured). Returns the metrics.jsonl rows, or the last lines of output on failure."""
    cmd = [sys.executable, "-m", "sempa_dist.cli.train", config, f"train.output_dir={out}", "train.save_every=0",
           "train.export=false", "tracking.enabled=false", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stdout + proc.stderr).splitlines()[-3:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def failed(rows: list[dict] | list[str]) -> bool:
    return not rows or isinstance(rows[0], str)


def median_step_time(rows: list[dict], warmup: int = 1) -> float:
    """Median step time after the first `warmup` steps."""
    return statistics.median(r["step_time_s"] for r in rows[warmup:] or rows)
