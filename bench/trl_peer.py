"""sempa-dist vs TRL's DPOTrainer, side by side in one run on this machine (benchmarks issue).

    pip install -e ".[bench]"      # TRL only here, never a runtime dependency
    SEMPA_DATA_DIR=../shared/data python bench/trl_peer.py [--steps 4] [--batch 16] [--out bench/trl_peer.json]

Same model (SmolLM2-135M-Instruct, fp32), data (the first steps x batch SNLI dev triplets, prompts
rendered by sempa_dist with the chat template; TRL reads them in sempa-dist's first-epoch order, so
step 1 is the same batch for both), beta 0.1, LoRA r8 alpha 32 on all linear layers,
global batch, learning rate, one machine. TRL runs in one process (its reference = the LoRA base
with adapters disabled); sempa-dist runs its default (ZeRO-3, 2 processes, offloaded reference engine)
and, for the like-for-like reference, `ref.mode=adapter`. Real tokens/s counts prompt + response
tokens of every chosen and rejected sequence once per sequence (the same count for both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from cell import REPO, failed, median_step_time, run_cell


def sempa_cell(name: str, overrides: list[str], a: argparse.Namespace, work: Path) -> dict:
    rows = run_cell("configs/smollm2_demo.yaml", work / name.replace(" ", "_"),
                    [f"train.max_steps={a.steps}", f"train.global_batch_size={a.batch}",
                     f"data.max_examples={a.batch * a.steps}", "train.learning_rate=1e-4", "train.warmup_ratio=0",
                     "train.lr_schedule=constant", *overrides])
    if failed(rows):
        return {"trainer": name, "error": rows}
    step = median_step_time(rows, a.warmup)
    return {"trainer": name, "step_time_s": step, "examples_per_s": a.batch / step,
            "loss_step1": rows[0]["loss"], "logps_chosen_step1": rows[0]["logps/chosen"]}


def trl_cell(name: str, padding_free: bool, a: argparse.Namespace, work: Path) -> dict:
    """TRL DPOTrainer in this process (2 threads, the whole machine)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from sempa_dist.config import load_config
    from sempa_dist.data import load_triplets
    from sempa_dist.data.tokenize import render_prompt, tokenize_triplets
    from sempa_dist.models import load_tokenizer, resolve_model
    from sempa_dist.packing import epoch_order

    model_name = [f"model.name={a.model}"] if getattr(a, "model", None) else []
    cfg = load_config(REPO / "configs" / "smollm2_demo.yaml", [f"data.max_examples={a.batch * a.steps}", *model_name])
    tok = load_tokenizer(cfg.model.name)
    rows, _ = load_triplets(cfg.data, seed=cfg.train.seed)
    # TRL reads the triplets in sempa-dist's first-epoch order, sequentially, so both trainers' step 1 is
    # the same batch and its chosen log-probs can be compared (with TRL's own shuffle they could not)
    if len(tokenize_triplets(rows, tok, cfg.data)[0]) != len(rows):
        raise SystemExit("sempa-dist dropped triplets in tokenising: its example order no longer indexes the rows")
    order = epoch_order(len(rows), cfg.train.seed, 0)
    ds = Dataset.from_list([{"prompt": render_prompt(tok, rows[i]["anchor"], cfg.data), "chosen": rows[i]["chosen"],
                             "rejected": rows[i]["rejected"][0]} for i in order])
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name), dtype=torch.float32)
    args = DPOConfig(output_dir=str(work / name), per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                     max_steps=a.steps, learning_rate=1e-4, lr_scheduler_type="constant", beta=0.1, logging_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", padding_free=padding_free, seed=cfg.train.seed,
                     max_length=cfg.data.max_length, dataloader_drop_last=True,
                     train_sampling_strategy="sequential")
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[Clock()])
    trainer.train()
    logs = [x for x in trainer.state.log_history if "loss" in x]
    step = statistics.median(times[a.warmup:] or times)
    return {"trainer": name, "step_time_s": step, "examples_per_s": a.batch / step, "loss_step1": logs[0]["loss"],
            "logps_chosen_step1": logs[0].get("logps/chosen")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the median step time")
    ap.add_argument("--out", default=str(REPO / "bench" / "trl_peer.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, overrides in [("sempa-dist (2 proc, ref engine, prefix sharing)", []),
                                ("sempa-dist (2 proc, ref engine replicated, prefix sharing)",
                                 ["deepspeed.ref_config=ds_configs/zero3_ref_replicated.json"]),
                                ("sempa-dist (1 proc, ref engine, prefix sharing)", ["train.nproc=1"]),
                                ("sempa-dist (2 proc, ref adapter, prefix sharing)", ["ref.mode=adapter"]),
                                ("sempa-dist (2 proc, ref adapter, packed, no sharing)", ["ref.mode=adapter", "packing.prefix_sharing=off"])]:
            results.append(sempa_cell(name, overrides, a, work))
            print(json.dumps(results[-1]), flush=True)
        for name, pf in [("TRL DPOTrainer (padded)", False), ("TRL DPOTrainer (padding_free=True)", True)]:
            try:
                results.append(trl_cell(name, pf, a, work))
            except Exception as e:  # a peer's failure is a result too, reported in the table
                results.append({"trainer": name, "error": [f"{type(e).__name__}: {e}"]})
            print(json.dumps(results[-1]), flush=True)
    trl = next((r for r in results if r["trainer"].startswith("TRL") and "error" not in r), None)
    print(f"\nSmolLM2-135M-Instruct fp32, LoRA r8, beta 0.1, global batch {a.batch}, {a.steps} steps, SNLI dev, this machine\n")
    print("| trainer | examples/s | vs TRL (padded) | step (s) | loss step 1 | logps/chosen step 1 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['trainer']} | error: {r['error']} | | | | |")
            continue
        rel = f"{r['examples_per_s'] / trl['examples_per_s']:.2f}x" if trl else "n/a"
        lp = r.get("logps_chosen_step1")
        print(f"| {r['trainer']} | {r['examples_per_s']:.2f} | {rel} | {r['step_time_s']:.1f} | {r['loss_step1']:.4f} | "
              f"{lp if lp is None else round(lp, 3)} |")
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
