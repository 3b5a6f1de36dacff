"""sempa-eval MODEL_OR_RUN [--tasks all] [--pooling last|mean] [--generation]

MODEL_OR_RUN: a registered model name (smollm2-135m-instruct), an HF model directory, a hub id, or a
run directory (its ``export/`` model is evaluated and the results are written beside it).
Prints Spearman x 100 per STS set and the average; ``--json`` writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sempa_dist.config import DEFAULT_EMBED_PROMPT


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sempa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model name, HF directory, hub id, or a run directory with export/")
    ap.add_argument("--tasks", default="all", help="comma list of sts12..sts16, stsb-dev, stsb-test, sickr-test, or 'all'")
    ap.add_argument("--pooling", choices=["last", "mean"], default="last")
    ap.add_argument("--prompt", default=DEFAULT_EMBED_PROMPT, help="embedding prompt with {sentence}")
    ap.add_argument("--no-normalize", action="store_true", help="feed sentences raw (no quote/punctuation normalisation)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-pairs", type=int, default=None, help="at most N pairs per set (fixed subset)")
    ap.add_argument("--generation", action="store_true", help="also compare held-out NLL/KL and paraphrases with --reference")
    ap.add_argument("--reference", default="smollm2-135m-instruct", help="reference model for --generation")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    return ap.parse_args(argv)


def resolve_target(model: str) -> tuple[str, Path | None]:
    """(model to load, run directory or None)."""
    path = Path(model)
    if (path / "export" / "config.json").is_file():
        return str(path / "export"), path
    if path.is_dir() and (path / "summary.json").is_file():
        raise SystemExit(f"sempa-eval: run {path} has no export/ (train with train.export=true or run sempa-export)")
    return model, None


def format_table(results: dict[str, float]) -> str:
    names = list(results)
    head = "| " + " | ".join(names) + " |"
    sep = "|" + "---|" * len(names)
    row = "| " + " | ".join(f"{results[n]:.2f}" for n in names) + " |"
    return "\n".join([head, sep, row])


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from sempa_dist.eval import Encoder, evaluate_sts, resolve_tasks

    try:
        tasks = resolve_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
        if not tasks:
            raise ValueError(f"--tasks {args.tasks!r} names no STS set")
        if args.max_pairs is not None and args.max_pairs < 2:
            raise ValueError(f"--max-pairs must be >= 2 (Spearman needs pairs), got {args.max_pairs}")
    except ValueError as e:
        print(f"sempa-eval: {e}", file=sys.stderr)
        return 2
    target, run_dir = resolve_target(args.model)
    t0 = time.time()
    encoder = Encoder.from_pretrained(target, prompt=args.prompt, pooling=args.pooling,
                                      normalize=not args.no_normalize, batch_size=args.batch_size)
    results = evaluate_sts(encoder.encode, tasks, max_pairs=args.max_pairs)
    out: dict = {"model": target, "tasks": tasks, "pooling": args.pooling, "normalize": not args.no_normalize,
                 "prompt": args.prompt, "sts": results, "time_s": round(time.time() - t0, 1)}
    print(format_table(results))
    if args.generation:
        from sempa_dist.eval.generation import generation_report

        del encoder
        out["generation"] = generation_report(target, args.reference)
        print(json.dumps({k: v for k, v in out["generation"].items() if k != "samples"}, indent=2))
    dest = args.json or (run_dir / "eval.json" if run_dir else None)
    if dest:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2))
        print(f"results: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
