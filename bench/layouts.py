"""Padded vs packed vs packed + prefix sharing, side by side in one run (benchmarks and prefix-sharing issues).

    SEMPA_DATA_DIR=../shared/data python bench/layouts.py [--model smollm2-135m-instruct] [--ks 1 3]
        [--steps 4] [--batch 16] [--nproc 2] [--out bench/layouts.json]

Each cell is one real `sempa-train` run on the SNLI dev triplets (same model, data order, global batch,
ZeRO-3 over `nproc` processes, LoRA r8, reference engine offloaded), differing only in
`packing.layout` / `packing.prefix_sharing`. Reported per cell: examples/s, real tokens/s, step time
(median of steps 2..N), tokens actually computed per step, peak RSS of rank 0. The token bound of a
cell is (tokens the padded cell computes per step) / (tokens this cell computes): the speed-up a
purely token-bound step would get over padded; "of bound" is the measured speed-up over it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cell import REPO, failed, median_step_time, run_cell

# packed rows under both CPU attention paths: one [row, row]-masked SDPA, or SDPA per segment (sdpa_varlen)
CELLS = [("padded", "packing.layout=padded", "packing.prefix_sharing=off", "model.attn_implementation=sdpa"),
         ("packed, row mask", "packing.layout=packed", "packing.prefix_sharing=off", "model.attn_implementation=sdpa"),
         ("packed, varlen", "packing.layout=packed", "packing.prefix_sharing=off", "model.attn_implementation=sdpa_varlen"),
         ("packed + prefix sharing, row mask", "packing.layout=packed", "packing.prefix_sharing=on",
          "model.attn_implementation=sdpa"),
         ("packed + prefix sharing, varlen", "packing.layout=packed", "packing.prefix_sharing=on",
          "model.attn_implementation=sdpa_varlen")]


def one(name: str, overrides: list[str], a: argparse.Namespace, k: int, work: Path) -> dict:
    rows = run_cell("configs/smollm2_demo.yaml", work / f"{name.replace(' ', '_').replace(',', '')}-k{k}",
                    [f"model.name={a.model}", f"data.num_rejected={k}", f"train.max_steps={a.steps}",
                     f"train.global_batch_size={a.batch}", f"packing.max_tokens={a.max_tokens}", f"train.nproc={a.nproc}",
                     "eval.every=0", f"data.max_examples={a.batch * a.steps}", *overrides])
    if failed(rows):
        return {"layout": name, "k": k, "error": rows}
    timed = rows[1:] or rows
    step = median_step_time(rows)
    real = statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    computed = statistics.median(r["tokens_per_s"] * r["step_time_s"] / max(1e-9, 1 - r["pad_fraction"]) for r in rows)
    return {"layout": name, "k": k, "step_time_s": step, "examples_per_s": a.batch / step,
            "real_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_computed_per_step": computed, "real_tokens_per_step": real,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "loss_step1": rows[0]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "layouts.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.ks:
            for name, *overrides in CELLS:
                r = one(name, overrides, a, k, Path(tmp))
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\nmodel {a.model}, {a.nproc} processes, global batch {a.batch}, max_tokens {a.max_tokens}, {a.steps} steps/cell\n")
    print("| K | layout | examples/s | speed-up vs padded | token bound | of bound | real tok/s | tokens computed/step | step (s) | peak RSS (MB) | loss step 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in a.ks:
        cells = [r for r in results if r["k"] == k]
        base = next((r for r in cells if r["layout"] == "padded" and "error" not in r), None)
        for r in cells:
            if "error" in r:
                print(f"| {k} | {r['layout']} | error: {r['error']} |||||||||")
                continue
            speed = r["examples_per_s"] / base["examples_per_s"] if base else float("nan")
            bound = base["tokens_computed_per_step"] / r["tokens_computed_per_step"] if base else float("nan")
            r.update(speedup=speed, token_bound=bound, of_bound=speed / bound)
            print(f"| {k} | {r['layout']} | {r['examples_per_s']:.2f} | {speed:.2f}x | {bound:.2f}x | {100 * speed / bound:.0f} % | "
                  f"{r['real_tokens_per_s']:.0f} | {r['tokens_computed_per_step']:.0f} | {r['step_time_s']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['loss_step1']:.4f} |")
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
