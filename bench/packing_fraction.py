"""Real-token fraction of packing on the SNLI triplets (SmolLM2-135M-Instruct tokenizer + chat template).

    SEMPA_DATA_DIR=../shared/data python bench/packing_fraction.py [--model smollm2-135m-instruct]

Rows are counted at full capacity (the fixed-shape view kernels and memory planning see). Reports the
whole-dataset first-fit-decreasing packing and the per-optimizer-step plan the trainer really uses
(global batch split over ranks, equal micro-steps), next to padded micro-batches of 8 sequences.
"""

from __future__ import annotations

import argparse
import json
import random

from sempa_dist.config import load_config
from sempa_dist.data import load_triplets, tokenize_triplets
from sempa_dist.models import load_tokenizer
from sempa_dist.packing import packing_efficiency, plan_step


def step_fraction(sizes, batch, world, cap, seed=0):
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    real = rows = 0
    for s in range(len(order) // batch):
        ids = order[s * batch : (s + 1) * batch]
        plan = plan_step([sizes[i] for i in ids], world, cap)
        real += sum(sizes[i] for i in ids)
        rows += sum(len(r) for r in plan)
    return real / (rows * cap)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--split", default="dev")
    a = ap.parse_args()
    cfg = load_config(None, ["data.source=snli", f"data.split={a.split}", f"model.name={a.model}"])
    tok = load_tokenizer(cfg.model.name)
    examples, rep = tokenize_triplets(load_triplets(cfg.data)[0], tok, cfg.data)
    sizes = [e.num_tokens for e in examples]
    seq_lens = [len(e.prompt_ids) + len(r) for e in examples for r in e.responses]
    out = {"examples": len(examples), "mean_seq_len": sum(seq_lens) / len(seq_lens), "max_seq_len": max(seq_lens)}
    for cap in (1024, 2048):
        out[f"ffd_whole_{cap}"] = packing_efficiency(sizes, cap)
        out[f"per_step_B256_w8_{cap}"] = step_fraction(sizes, 256, 8, cap)
        out[f"per_step_B64_w2_{cap}"] = step_fraction(sizes, 64, 2, cap)
    pad = []
    for i in range(0, len(seq_lens) - 7, 8):
        chunk = seq_lens[i : i + 8]
        pad.append((sum(chunk), 8 * max(chunk)))
    out["padded_8_real_fraction"] = sum(r for r, _ in pad) / sum(t for _, t in pad)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
