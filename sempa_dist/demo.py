"""`make demo`: SemPA on a real model, measured before and after.

1. STS-B test Spearman of the untrained SmolLM2-135M-Instruct (PromptEOL, last token);
2. SemPA training with configs/smollm2_demo.yaml: LoRA, ZeRO-3 over 2 processes, reference on its
   own offloaded engine, SNLI triplets from $SEMPA_DATA_DIR (else the bundled preference set);
3. STS-B test of the exported model, and the generation check (held-out NLL, KL to the reference,
   greedy paraphrases) against the untrained model;
4. a before/after table; everything under runs/demo/ (summary.json, demo.json, export/).

Extra arguments are config overrides for the training run (e.g. ``train.max_steps=10``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from sempa_dist.cli.train import main as train_main
from sempa_dist.paths import REPO_ROOT, data_dir

# configs/ is not package data: the demo runs from a checkout
CONFIG = REPO_ROOT / "configs" / "smollm2_demo.yaml"
OUT = Path("runs/demo")


def sts(model: str, tasks: list[str]) -> dict[str, float]:
    from sempa_dist.eval import Encoder, evaluate_sts

    return evaluate_sts(Encoder.from_pretrained(model).encode, tasks)


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    from sempa_dist.config import load_config
    from sempa_dist.eval.generation import generation_report
    from sempa_dist.eval.sts import data_available

    if not any(o.startswith("data.source=") for o in overrides) and not _snli_available():
        print("demo: no SNLI triplets under $SEMPA_DATA_DIR: training on the bundled preference set")
        overrides.append("data.source=bundled")
    overrides = [f"train.output_dir={OUT}", *overrides]
    cfg = load_config(CONFIG, overrides)
    base = cfg.model.name
    tasks = ["stsb-test"] if data_available() else []
    if not tasks:
        print("demo: no STS data under $SEMPA_DATA_DIR: STS before/after skipped (set SEMPA_DATA_DIR)")
    if OUT.exists():  # the demo's own directory: each `make demo` is a fresh run
        print(f"demo: removing the previous demo run {OUT}")
        shutil.rmtree(OUT)
    t0 = time.time()
    before = sts(base, tasks) if tasks else {}
    t_before = time.time() - t0
    rc = train_main([str(CONFIG), *overrides])
    if rc != 0:
        return rc
    t1 = time.time()
    export = str(OUT / "export")
    after = sts(export, tasks) if tasks else {}
    generation = generation_report(export, base)
    t_after = time.time() - t1
    summary = json.loads((OUT / "summary.json").read_text())
    result = {"model": base, "sts_before": before, "sts_after": after, "generation": generation,
              "train": {"steps": summary["steps"], "time_s": summary["time_s"], "final": summary["final"]},
              "eval_time_s": {"before": t_before, "after": t_after}, "total_time_s": time.time() - t0}
    (OUT / "demo.json").write_text(json.dumps(result, indent=2))
    if cfg.tracking.enabled and summary.get("mlflow_run_id"):
        log_to_run(cfg, summary["mlflow_run_id"], result)
    print(table(result))
    print(f"\nrun directory: {OUT.resolve()} (summary.json, demo.json, checkpoints/, export/)")
    return 0


def log_to_run(cfg, run_id: str, result: dict) -> None:
    """Before/after STS and the generation check go into the training run's MLflow record (a
    failure to reach the store only warns: the results are in demo.json either way)."""
    from mlflow.entities import Metric

    from sempa_dist.tracking import open_client, resolve_uri

    step = result["train"]["steps"]
    values = {**{f"demo/sts_before/{k}": v for k, v in result["sts_before"].items()},
              **{f"demo/sts_after/{k}": v for k, v in result["sts_after"].items()},
              **{f"demo/generation/{k}": v for k, v in result["generation"].items() if isinstance(v, (int, float))}}
    try:
        client = open_client(resolve_uri(cfg.tracking.uri, cfg.train.output_dir))
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in values.items()])
        client.log_artifact(run_id, str(OUT / "demo.json"))
    except Exception as e:  # the store being down must not lose the printed results
        print(f"demo: could not log the evaluation to MLflow run {run_id}: {e}")


def _snli_available() -> bool:
    root = data_dir()
    return root is not None and (root / "nli" / "snli" / "s1.dev").is_file()


def table(r: dict) -> str:
    """Markdown before/after table of the demo's measurements."""
    rows = ["| measure | before (untrained) | after SemPA | change |", "|---|---|---|---|"]
    for task, b in r["sts_before"].items():
        a = r["sts_after"][task]
        rows.append(f"| STS Spearman x100: {task} | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    g = r["generation"]
    for kind in ("english", "responses"):
        if f"nll_policy/{kind}" in g:
            b, a = g[f"nll_reference/{kind}"], g[f"nll_policy/{kind}"]
            rows.append(f"| held-out NLL/token: {kind} | {b:.4f} | {a:.4f} | {100 * (a - b) / b:+.2f} % |")
            rows.append(f"| KL(policy ‖ reference)/token: {kind} | 0 | {g[f'kl/{kind}']:.4f} | |")
    f = r["train"]["final"]
    rows.append(f"| train reward accuracy (last step) | | {f.get('rewards/accuracy', float('nan')):.2f} | |")
    rows.append(f"| train time (s), {r['train']['steps']} steps | | {r['train']['time_s']:.0f} | |")
    rows.append(f"| total demo time (s) | | {r['total_time_s']:.0f} | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
