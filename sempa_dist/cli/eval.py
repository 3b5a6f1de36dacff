"""sempa-eval MODEL_OR_RUN [--tasks all|none] [--pooling last|mean] [--generation] [--lm-eval TASKS]

MODEL_OR_RUN: a registered model name (smollm2-135m-instruct), an HF model directory, a hub id, or a
run directory (its ``export/`` model is evaluated and the results are written beside it).
Prints Spearman x 100 per STS set and the average; ``--json`` writes them to a file.

``--lm-eval mmlu:5,gsm8k_cot:8,...`` (or ``paper``: the paper's five benchmarks and shot counts) also
runs lm-evaluation-harness (optional extra: pip install 'sempa-dist[lm-eval]'), side by side on the
reference (--reference, else a run's base model: its config.yaml model.name) and the model; a task
without ``:N`` keeps its own default few-shot count. For a run directory the scores also go to the
run's MLflow record. Those tasks download their data from the hub; ``--tasks none`` skips STS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sempa_dist.config import DEFAULT_EMBED_PROMPT

GENERATION_REFERENCE = "smollm2-135m-instruct"
# lm-eval's task spec of the paper; a literal here so that --help never imports the harness module
PAPER_TASKS = "mmlu:5,gsm8k_cot:8,drop:3,truthfulqa_mc1:0,hellaswag:0"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sempa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model name, HF directory, hub id, or a run directory with export/")
    ap.add_argument("--tasks", default="all",
                    help="comma list of sts12..sts16, stsb-dev, stsb-test, sickr-test, or 'all'; 'none': no STS")
    ap.add_argument("--pooling", choices=["last", "mean"], default="last")
    ap.add_argument("--prompt", default=DEFAULT_EMBED_PROMPT, help="embedding prompt with {sentence}")
    ap.add_argument("--no-normalize", action="store_true", help="feed sentences raw (no quote/punctuation normalisation)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-pairs", type=int, default=None, help="at most N pairs per set (fixed subset)")
    ap.add_argument("--generation", action="store_true", help="also compare held-out NLL/KL and paraphrases with --reference")
    ap.add_argument("--reference", default=None,
                    help=f"reference model for --generation (default {GENERATION_REFERENCE}) and for --lm-eval "
                         "(default: a run's base model, config.yaml model.name; none for a plain model)")
    ap.add_argument("--lm-eval", default=None, metavar="TASKS",
                    help="lm-evaluation-harness tasks, comma list of task[:n_shot] (no :n_shot: the task's default), "
                         f"or 'paper' = {PAPER_TASKS}")
    ap.add_argument("--lm-eval-limit", type=int, default=None, metavar="N",
                    help="at most N documents per lm-eval task (quick checks; not comparable to published scores)")
    ap.add_argument("--lm-eval-tasks-dir", type=Path, default=None, metavar="DIR",
                    help="extra lm-eval task yamls (local tasks, or overrides of the harness's own)")
    ap.add_argument("--lm-eval-batch-size", default=None, metavar="N|auto",
                    help="lm-eval batch size (default: auto on a GPU, 8 on a CPU)")
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
    target, run_dir = resolve_target(args.model)
    try:
        tasks = parse_sts_tasks(args.tasks)
        if args.max_pairs is not None and args.max_pairs < 2:
            raise ValueError(f"--max-pairs must be >= 2 (Spearman needs pairs), got {args.max_pairs}")
        if not (tasks or args.generation or args.lm_eval):
            raise ValueError("--tasks none leaves nothing to evaluate (add --generation or --lm-eval)")
        harness_setup = prepare_lm_eval(args) if args.lm_eval else None  # fail here, not after STS
    except (ValueError, ImportError) as e:
        if isinstance(e, ImportError) and not _lm_eval_missing(e):
            raise  # a broken install is a traceback; only the absent optional extra is a one-liner
        print(f"sempa-eval: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    out: dict = {"model": target, "tasks": tasks}
    if tasks:
        from sempa_dist.eval import Encoder, evaluate_sts

        encoder = Encoder.from_pretrained(target, prompt=args.prompt, pooling=args.pooling,
                                          normalize=not args.no_normalize, batch_size=args.batch_size)
        results = evaluate_sts(encoder.encode, tasks, max_pairs=args.max_pairs)
        del encoder
        out.update({"pooling": args.pooling, "normalize": not args.no_normalize, "prompt": args.prompt,
                    "sts": dict(results), "sts_sources": results.sources})
        print(format_table(results))
        for task, source in results.sources.items():  # which files were scored: local SentEval or the hub's
            print(f"  {task}: {source}")
    if args.generation:
        from sempa_dist.eval.generation import generation_report

        out["generation"] = generation_report(target, args.reference or GENERATION_REFERENCE)
        print(json.dumps({k: v for k, v in out["generation"].items() if k != "samples"}, indent=2))
    if harness_setup is not None:
        out["lm_eval"] = run_lm_eval(args, harness_setup, target, run_dir)
    out["time_s"] = round(time.time() - t0, 1)
    dest = args.json or (run_dir / "eval.json" if run_dir else None)
    if dest:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2))
        print(f"results: {dest}")
    if harness_setup is not None:
        if run_dir is not None:
            log_lm_eval(run_dir, out["lm_eval"])
        else:
            print("sempa-eval: lm-eval scores not logged to MLflow: MODEL is not a run directory")
    return 0


def _lm_eval_missing(e: ImportError) -> bool:
    from sempa_dist.eval.harness import LmEvalUnavailable

    return isinstance(e, LmEvalUnavailable)


def parse_sts_tasks(text: str) -> list[str]:
    """--tasks -> STS set names; 'none' -> [] (only --generation / --lm-eval). ValueError names a bad one."""
    from sempa_dist.sts_tasks import resolve_tasks

    if text.strip().lower() == "none":
        return []
    tasks = resolve_tasks([t.strip() for t in text.split(",") if t.strip()])
    if not tasks:
        raise ValueError(f"--tasks {text!r} names no STS set (use 'none' to skip STS)")
    return tasks


def prepare_lm_eval(args: argparse.Namespace) -> tuple[list, object]:
    """(task specs, task manager) for --lm-eval, checked before any model loads: lm-eval installed
    (else ImportError with the install line), the task list well-formed and every name known
    (else ValueError)."""
    from sempa_dist.eval.harness import parse_task_specs, require_lm_eval, task_manager

    require_lm_eval()
    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise ValueError(f"--lm-eval-limit must be >= 1, got {args.lm_eval_limit}")
    batch = args.lm_eval_batch_size
    if batch is not None and batch != "auto" and not (batch.isdigit() and int(batch) >= 1):
        raise ValueError(f"--lm-eval-batch-size must be a number >= 1 or 'auto', got {batch!r}")
    specs = parse_task_specs(args.lm_eval)
    return specs, task_manager(specs, args.lm_eval_tasks_dir)


def run_base_model(run_dir: Path) -> str | None:
    """The model a run started from (its config.yaml's model.name): the reference of its export."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    return ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("name")


def run_lm_eval(args: argparse.Namespace, setup: tuple[list, object], target: str, run_dir: Path | None) -> dict:
    """lm-eval on the reference and the model side by side (the model alone when there is no
    reference); prints the table and returns the report."""
    from sempa_dist.distributed import device_type
    from sempa_dist.eval.harness import compare, format_table
    from sempa_dist.models import resolve_model

    specs, manager = setup
    reference = args.reference or (run_base_model(run_dir) if run_dir else None)
    if reference is None:
        why = f"{run_dir}/config.yaml names no model.name" if run_dir else "no --reference"
        print(f"sempa-eval: lm-eval on the model alone ({why})")
    models = {"reference": str(resolve_model(reference)), "trained": str(resolve_model(target))} if reference \
        else {"model": str(resolve_model(target))}
    device = device_type()
    batch = args.lm_eval_batch_size or ("auto" if device == "cuda" else "8")
    report = compare(models, specs, limit=args.lm_eval_limit, manager=manager, device=device,
                     batch_size=batch if batch == "auto" else int(batch))
    limit = f", at most {args.lm_eval_limit} documents per task" if args.lm_eval_limit else ""
    print(f"lm-eval {report['lm_eval_version']}{limit}:")
    print(format_table(report))
    return report


def run_tracking(run_dir: Path) -> tuple[str, str] | str:
    """(tracking URI, MLflow run id) of a run directory's own MLflow record, or why there is none.

    The run id is summary.json's mlflow_run_id; the URI is config.yaml's tracking.uri, else the one the
    run's tracker resolved and kept in tracking.json (tracking.uri null: $MLFLOW_TRACKING_URI or the
    sqlite store beside the run, as it was when the run trained)."""
    import yaml

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return f"summary.json unreadable ({e})"
    run_id = summary.get("mlflow_run_id") if isinstance(summary, dict) else None
    if not run_id:
        return "summary.json has no mlflow_run_id (the run was not tracked)"
    uri = None
    if (run_dir / "config.yaml").is_file():
        uri = ((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("tracking") or {}).get("uri")
    if not uri and (run_dir / "tracking.json").is_file():
        uri = json.loads((run_dir / "tracking.json").read_text()).get("uri")
    if not uri:
        return "no tracking URI in config.yaml (tracking.uri) nor in tracking.json"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return f"the run's store {uri} does not exist here (moved run directory?)"
    return uri, run_id


def log_lm_eval(run_dir: Path, report: dict) -> bool:
    """Log the lm-eval scores to the run's own MLflow run: metrics lm_eval/<model>/<task>/<metric> at
    the run's last step, the task list as tags, the report as artifact lm_eval.json. A missing record
    or an unreachable store is a note, not an error: the scores are in the JSON already."""
    where = run_tracking(run_dir)
    if isinstance(where, str):
        print(f"sempa-eval: lm-eval scores not logged to MLflow: {where}")
        return False
    uri, run_id = where
    try:
        from mlflow.entities import Metric, RunTag

        from sempa_dist.eval.harness import mlflow_metrics

        # the tracker's client: short HTTP timeouts (the results are on disk already), its batch limit
        from sempa_dist.tracking.store import MAX_METRICS, open_client

        summary = json.loads((run_dir / "summary.json").read_text())
        step, ts = int(summary.get("steps") or 0), int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in mlflow_metrics(report).items()]
        tags = [RunTag("lm_eval.tasks", ",".join(report["tasks"])), RunTag("lm_eval.limit", str(report["limit"])),
                RunTag("lm_eval.version", report["lm_eval_version"])]
        client = open_client(uri)
        for i in range(0, len(metrics), MAX_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS], tags=tags if i == 0 else [])
        if not metrics:
            client.log_batch(run_id, tags=tags)
        client.log_dict(run_id, report, "lm_eval.json")
    except Exception as e:  # the store being down must not lose the printed and written results
        print(f"sempa-eval: could not log the lm-eval scores to MLflow run {run_id} at {uri}: "
              f"{type(e).__name__}: {str(e)[:300]}")
        return False
    print(f"lm-eval scores logged to MLflow run {run_id} ({len(metrics)} metrics)")
    return True


if __name__ == "__main__":
    sys.exit(main())
