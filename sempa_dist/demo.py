"""`make demo`: the main job on embedded defaults.

Until the representation-quality work lands (SmolLM2-135M-Instruct, STS before/after), this is the
smoke run of what exists: configs/tiny_cpu.yaml (tiny random Llama, bundled preference set, 2 ZeRO-3
processes with an offloaded reference engine) into runs/demo, then a before/after table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sempa_dist.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    out = Path("runs/demo")
    rc = train_main([str(REPO / "configs" / "tiny_cpu.yaml"), f"train.output_dir={out}"])
    if rc != 0:
        return rc
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    print(f"\n| metric | step 1 | step {last['step']} |\n|---|---|---|")
    for key in ("loss", "rewards/accuracy", "rewards/margin", "tokens_per_s"):
        print(f"| {key} | {first[key]:.4f} | {last[key]:.4f} |")
    print(f"\nrun directory: {out.resolve()} (summary.json, checkpoints/, export/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
