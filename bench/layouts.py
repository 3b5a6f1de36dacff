"""Padded vs packed vs packed + prefix sharing, side by side in one run (benchmarks and prefix-sharing issues).

    SEMPA_DATA_DIR=../shared/data python bench/layouts.py [--model smollm2-135m-instruct] [--ks 1 3]
        [--steps 6] [--warmup 2] [--batch 16] [--nproc 2] [--row-mask] [--no-trl] [--out bench/layouts.json]

Each cell is one real `sempa-train` run on the SNLI dev triplets (same model, data order, global batch,
ZeRO-3 over `nproc` processes, LoRA r8, reference engine offloaded), differing only in
`packing.layout` / `packing.prefix_sharing` (and, with --row-mask, the CPU attention path). Reported per
cell: examples/s, data tokens/s (prompt + response tokens of every chosen and rejected sequence, the
same count for every layout, so its ratios are the examples/s ratios), step time (median after
`--warmup` steps), tokens actually computed per step, peak RSS of rank 0. The token bound of a cell is
(tokens the padded cell computes per step) / (tokens this cell computes): the speed-up a purely
token-bound step would get over padded; "of bound" is the measured speed-up over it. At K = 1 TRL's
DPOTrainer (the `bench` extra) runs on the same data, model, beta and batch in the same run (TRL is
pairwise: no K = 3 row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cell import REPO, failed, median_step_time, run_cell
from compute_only import compute_cell

from sempa_dist.phase_times import PHASES, metric_name

# packed rows under the default CPU attention (sdpa_varlen: SDPA per segment) and, with --row-mask,
# under one [row, row]-masked SDPA as well
CELLS = [("padded", "packing.layout=padded", "packing.prefix_sharing=off", "model.attn_implementation=sdpa"),
         ("packed, row mask", "packing.layout=packed", "packing.prefix_sharing=off", "model.attn_implementation=sdpa"),
         ("packed, varlen", "packing.layout=packed", "packing.prefix_sharing=off", "model.attn_implementation=sdpa_varlen"),
         ("packed + prefix sharing, row mask", "packing.layout=packed", "packing.prefix_sharing=on",
          "model.attn_implementation=sdpa"),
         ("packed + prefix sharing, varlen", "packing.layout=packed", "packing.prefix_sharing=on",
          "model.attn_implementation=sdpa_varlen")]
TRL = "TRL DPOTrainer (padded)"
CONFIG = "configs/smollm2_demo.yaml"


def cell_overrides(a: argparse.Namespace, k: int, overrides: list[str]) -> list[str]:
    return [f"model.name={a.model}", f"data.num_rejected={k}", f"train.max_steps={a.steps}",
            f"train.global_batch_size={a.batch}", f"packing.max_tokens={a.max_tokens}", f"train.nproc={a.nproc}",
            "eval.every=0", f"data.max_examples={a.batch * a.steps}", *a.set, *overrides]


def one(name: str, overrides: list[str], a: argparse.Namespace, k: int, work: Path) -> dict:
    rows = run_cell(CONFIG, work / f"{name.replace(' ', '_').replace(',', '')}-k{k}", cell_overrides(a, k, overrides))
    if failed(rows):
        return {"layout": name, "k": k, "error": rows}
    timed = rows[a.warmup:] or rows
    step = median_step_time(rows, a.warmup)
    real = statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    computed = statistics.median(r["tokens_per_s"] * r["step_time_s"] / max(1e-9, 1 - r["pad_fraction"]) for r in rows)
    return {"layout": name, "k": k, "step_time_s": step, "examples_per_s": a.batch / step,
            "real_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_computed_per_step": computed, "real_tokens_per_step": real,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "loss_step1": rows[0]["loss"],
            # rank 0's seconds per phase (train.phase_times), medians over the timed steps
            "phases": {p: statistics.median(r[metric_name(p)] for r in timed) for p in PHASES if metric_name(p) in rows[0]}}


def trl(a: argparse.Namespace, work: Path) -> dict:
    """TRL's DPOTrainer on the same data, model, beta and global batch (one process, both cores)."""
    from trl_peer import trl_cell

    try:
        r = trl_cell(TRL, False, a, work)
    except Exception as e:  # a peer's failure is a result too, reported in the table
        return {"layout": TRL, "k": 1, "error": [f"{type(e).__name__}: {e}"]}
    return {"layout": TRL, "k": 1, "step_time_s": r["step_time_s"], "examples_per_s": r["examples_per_s"],
            "loss_step1": r["loss_step1"]}


def layer_and_head_params(model: str) -> tuple[int, int]:
    """Weights every computed token meets (the decoder layers) and those only scored positions meet (the
    LM head); counted on the meta device. A token's matmul FLOPs are proportional to the weights it meets."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sempa_dist.models import resolve_model

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    return sum(p.numel() for p in m.model.layers.parameters()), m.get_output_embeddings().weight.numel()


def scored_per_step(cells: list[dict], k: int) -> float | None:
    """Response tokens per step (the positions the LM head scores: the same in every layout). Prefix sharing
    drops exactly K prompt copies per example, so prompt tokens = (real padded - real shared) / K."""
    pad = next((r for r in cells if r["layout"] == "padded" and "error" not in r), None)
    shared = next((r for r in cells if "prefix sharing" in r["layout"] and "error" not in r), None)
    if pad is None or shared is None:
        return None
    return shared["real_tokens_per_step"] - (pad["real_tokens_per_step"] - shared["real_tokens_per_step"]) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2,
                    help="steps left out of the median step time (with one micro-step a step, ZeRO-3's second is slow too)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--row-mask", action="store_true", help="also run packed rows under one [row, row]-masked SDPA")
    ap.add_argument("--no-trl", action="store_true", help="leave out the TRL DPOTrainer cell")
    ap.add_argument("--no-compute-only", action="store_true",
                    help="leave out each layout's compute alone (rank 0's micro-batches, plain models, one thread)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every sempa-train cell (e.g. another DeepSpeed config)")
    ap.add_argument("--out", default=str(REPO / "bench" / "layouts.json"))
    ap.add_argument("--table-from", help="print the table of an earlier run's JSON instead of running")
    a = ap.parse_args()
    results = json.loads(Path(a.table_from).read_text()) if a.table_from else run(a)
    table(results, a)
    if not a.table_from:
        Path(a.out).write_text(json.dumps(results, indent=2))


def run(a: argparse.Namespace) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.ks:
            for name, *overrides in CELLS:
                if "row mask" in name and not a.row_mask:
                    continue
                r = one(name, overrides, a, k, Path(tmp))
                if not a.no_compute_only and "error" not in r:
                    r["compute_only"] = compute_cell(CONFIG, cell_overrides(a, k, overrides), a.steps, a.warmup, a.nproc)
                results.append(r)
                print(json.dumps(r), flush=True)
            if k == 1 and not a.no_trl:
                results.append(trl(a, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
    return results


def table(results: list[dict], a: argparse.Namespace) -> None:
    """Markdown table; the matmul bound adds to the token bound the LM head's work on scored tokens."""
    layer_w, head_w = layer_and_head_params(a.model)
    print(f"\nmodel {a.model}, {a.nproc} processes, global batch {a.batch}, max_tokens {a.max_tokens}, {a.steps} steps/cell\n")
    print("| K | layout | examples/s | speed-up vs padded | token bound | of bound | matmul bound | of it | data tok/s | "
          "tokens computed/step | padding | step (s) | peak RSS (MB) | loss step 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in sorted({r["k"] for r in results}):
        cells = [r for r in results if r["k"] == k]
        base = padded_of(cells, k)
        scored = scored_per_step(cells, k)
        for r in cells:
            if "error" in r:
                print(f"| {k} | {r['layout']} | error: {r['error']} ||||||||||||")
                continue
            speed = r["examples_per_s"] / base["examples_per_s"] if base else float("nan")
            data_tps = base["real_tokens_per_step"] / r["step_time_s"] if base else float("nan")
            r.update(speedup=speed, data_tokens_per_s=data_tps)
            if r["layout"] == TRL:  # its tokens computed are not reported by TRL: no bound
                print(f"| {k} | {r['layout']} | {r['examples_per_s']:.2f} | {speed:.2f}x | | | | | {data_tps:.0f} | | | "
                      f"{r['step_time_s']:.1f} | | {r['loss_step1']:.4f} |")
                continue
            bound = base["tokens_computed_per_step"] / r["tokens_computed_per_step"] if base else float("nan")
            mm = float("nan")
            if base and scored is not None:
                mm = ((base["tokens_computed_per_step"] * layer_w + scored * head_w)
                      / (r["tokens_computed_per_step"] * layer_w + scored * head_w))
            r.update(token_bound=bound, of_bound=speed / bound, matmul_bound=mm, of_matmul_bound=speed / mm)
            print(f"| {k} | {r['layout']} | {r['examples_per_s']:.2f} | {speed:.2f}x | {bound:.2f}x | {100 * speed / bound:.0f} % | "
                  f"{mm:.2f}x | {100 * speed / mm:.0f} % | {data_tps:.0f} | {r['tokens_computed_per_step']:.0f} | "
                  f"{100 * (1 - r['real_tokens_per_step'] / r['tokens_computed_per_step']):.0f} % | "
                  f"{r['step_time_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['loss_step1']:.4f} |")
    phase_table(results)
    compute_table(results)


def padded_of(cells: list[dict], k: int) -> dict | None:
    """The padded cell at this K (every speed-up's baseline), if it ran."""
    return next((r for r in cells if r["k"] == k and r["layout"] == "padded" and "error" not in r), None)


def phase_table(results: list[dict]) -> None:
    """Where a step's time goes, per cell (rank 0, medians): each phase's seconds and its speed-up over the
    padded cell's same phase; "other" is the rest of the step (batch building, metrics, the all-reduce):
    the median step less the phases' medians, which do not add up exactly, so it gets no speed-up and
    can be a little below zero."""
    cells = [r for r in results if r.get("phases")]
    if not cells:
        return

    def split(r: dict) -> dict[str, float]:
        return {**r["phases"], "other": r["step_time_s"] - sum(r["phases"].values())}

    names = list(split(cells[0]))
    print("\n| K | layout | " + " | ".join(names) + " | step (s) |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for r in cells:
        base = padded_of(cells, r["k"])
        mine, theirs = split(r), split(base) if base else {}
        parts = [f"{mine[n]:.2f}" + (f" ({theirs[n] / mine[n]:.2f}x)" if base is not r and n != "other" and theirs.get(n) and mine[n] > 0 else "")
                 for n in names]
        print(f"| {r['k']} | {r['layout']} | " + " | ".join(parts) + f" | {r['step_time_s']:.2f} |")


def compute_table(results: list[dict]) -> None:
    """Each layout's compute alone (bench/compute_only.py) beside the trainer's step: the speed-up the
    layout earns in compute, and the seconds the distributed setup adds to every step."""
    cells = [r for r in results if r.get("compute_only")]
    if not cells:
        return
    print("\n| K | layout | compute alone (s) | its speed-up vs padded | of token bound | trainer step (s) | "
          "added by ZeRO-3 over 2 processes (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in cells:
        base = padded_of(cells, r["k"])
        c = r["compute_only"]["step_time_s"]
        speed = base["compute_only"]["step_time_s"] / c if base else float("nan")
        bound = r.get("token_bound", float("nan"))
        print(f"| {r['k']} | {r['layout']} | {c:.2f} | {speed:.2f}x | {100 * speed / bound:.0f} % | "
              f"{r['step_time_s']:.2f} | {r['step_time_s'] - c:.2f} |")


if __name__ == "__main__":
    main()
