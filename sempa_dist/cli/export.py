"""sempa-export CHECKPOINT OUT: a consolidated HF model directory from a sempa-dist checkpoint.

CHECKPOINT is a run directory (its latest complete checkpoint is used) or one checkpoint
directory (``<run>/checkpoints/step-000120``). Runs on one process, no GPU needed: the ZeRO-3
shards are reassembled on CPU.

OUT holds the model (LoRA merged) with its tokenizer, loadable by AutoModelForCausalLM and, with the
run's embedding prompt and pooling (eval.*), by sentence_transformers.SentenceTransformer(OUT). A
LoRA run also gets OUT/adapter, its PEFT adapter (base_model_name_or_path: the base model it was
trained on). --keep-adapter writes the adapter alone as OUT (no merged model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sempa_dist import checkpoint
from sempa_dist.config import load_config
from sempa_dist.export import export_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sempa-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--keep-adapter", action="store_true",
                    help="LoRA: write only the peft adapter (as OUT), no merged model")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    src = args.checkpoint
    tag_dir = checkpoint.find_resume("auto", src) if (src / "checkpoints").is_dir() else checkpoint.find_resume(str(src), src)
    if tag_dir is None:
        print(f"sempa-export: no complete checkpoint under {src}", file=sys.stderr)
        return 2
    run_dir = tag_dir.parent.parent
    cfg = load_config(run_dir / "config.yaml")
    out = export_model(tag_dir, args.out, cfg, merge_lora=not args.keep_adapter)
    print(f"exported {tag_dir} -> {out}")
    if out.adapter is not None and out.model is not None:
        print(f"  peft adapter: {out.adapter}")
    if out.sentence_transformers:
        print(f"  loads as SentenceTransformer({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
