"""Step time and peak RSS per process for each reference mode, 2 CPU processes (closing note of the
distributed issue). Side by side in one run; prints a table and writes JSON.

    python bench/step_profile.py [--models tiny-llama random-smollm2-shape] [--steps 4] [--out bench/step_profile.json]

Each cell is one `sempa-train` run (ZeRO-3, LoRA r8 so that the adapter mode is possible, packed rows of
about 256 tokens, global batch 8); step time is the median of steps 2..N, RSS the peak of rank 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cell import REPO, failed, median_step_time, run_cell


def one(model: str, dtype: str, mode: str, steps: int, work: Path) -> dict:
    rows = run_cell("configs/tiny_cpu.yaml", work / f"{model}-{dtype}-{mode}",
                    [f"model.name={model}", f"model.dtype={dtype}", "model.lora.enabled=true", f"ref.mode={mode}",
                     f"train.max_steps={steps}", "train.global_batch_size=8", "packing.max_tokens=256",
                     "train.nproc=2", f"ref.cache_dir={work}/ref_cache"])
    if failed(rows):
        return {"model": model, "dtype": dtype, "ref": mode, "error": rows}
    timed = rows[1:] or rows
    return {
        "model": model, "dtype": dtype, "ref": mode,
        "step_time_s": median_step_time(rows),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "micro_steps": rows[-1]["micro_steps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "random-smollm2-shape"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["engine", "adapter", "precomputed"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "bench" / "step_profile.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            for dtype in a.dtypes:
                for mode in a.modes:
                    r = one(model, dtype, mode, a.steps, Path(tmp))
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print("\n| model | dtype | ref mode | step time (s) | real tokens/s | peak RSS rank 0 (MB) |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['dtype']} | {r['ref']} | error: {r['error']} | | |")
        else:
            print(f"| {r['model']} | {r['dtype']} | {r['ref']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
