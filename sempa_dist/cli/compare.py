"""sempa-compare: runs side by side, from the local MLflow store or a tracking server.

Selects runs by experiment, run name, run id, MLflow filter string or run directory; prints the
params that differ between them and, for each chosen metric, its final and best value.

    sempa-compare --experiment sempa                                   # every run of an experiment
    sempa-compare --filter "tags.loss_type = 'dpo'" --sort "loss:asc" --format markdown
    sempa-compare runs/beta0.1 runs/beta0.2 --plot curves.png          # run directories (tracking.json)
    sempa-compare --uri http://head-node:5000 --name beta0.1 --name beta0.2 --format csv
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

DEFAULT_METRICS = "loss,rewards/accuracy,sts/*"
# metrics where lower is better (best = minimum); every other metric: higher is better
LOWER_IS_BETTER = ("loss", "nll", "perplexity", "kl", "time", "pad_fraction", "memory", "rss")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sempa-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="*", help="run directories: their tracking.json names the store and the run")
    ap.add_argument("--uri", help="tracking URI (default: the run directories' store, else $MLFLOW_TRACKING_URI, "
                                  "else sqlite:///runs/mlflow.db)")
    ap.add_argument("--experiment", action="append", default=[], help="experiment name (repeatable; default: all)")
    ap.add_argument("--name", "--run-name", dest="names", action="append", default=[], help="run name (repeatable)")
    ap.add_argument("--run-id", dest="run_ids", action="append", default=[], help="run id (repeatable)")
    ap.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.loss_type = 'dpo'\"")
    ap.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma list, * wildcards (default: {DEFAULT_METRICS})")
    ap.add_argument("--sort", help="COLUMN[:asc|desc]: a metric (its final value), 'METRIC best', a param or 'run'")
    ap.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    ap.add_argument("--ignore-params", default="train.output_dir",
                    help="params never shown as differing (comma list; default: train.output_dir)")
    ap.add_argument("--plot", metavar="OUT.png", help="draw the chosen metrics against step, one line per run")
    return ap.parse_args(argv)


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def select_runs(client, args: argparse.Namespace, dir_run_ids: list[str]) -> list[Any]:
    """Runs named by id or run directory, plus those the experiment/name/filter search finds."""
    runs = {rid: client.get_run(rid) for rid in [*dir_run_ids, *args.run_ids]}
    if args.experiment or args.names or args.filter or not runs:
        if args.experiment:
            exps = []
            for name in args.experiment:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise SystemExit(f"sempa-compare: no experiment named {name!r}")
                exps.append(exp.experiment_id)
        else:
            exps = [e.experiment_id for e in client.search_experiments()]
        token = None
        while True:
            page = client.search_runs(exps, filter_string=args.filter, max_results=1000, page_token=token,
                                      order_by=["attributes.start_time ASC"])
            for run in page:
                if not args.names or run.info.run_name in args.names:
                    runs.setdefault(run.info.run_id, run)
            token = page.token
            if not token:
                break
    return list(runs.values())


def metric_keys(runs: list[Any], patterns: str) -> list[str]:
    """The metrics to show: each pattern in order; wildcards expand to the keys present, sorted."""
    present = sorted({k for r in runs for k in r.data.metrics})
    keys: list[str] = []
    for pat in (p.strip() for p in patterns.split(",") if p.strip()):
        matches = [k for k in present if fnmatch.fnmatchcase(k, pat)] if any(c in pat for c in "*?[") else [pat]
        keys += [k for k in matches if k not in keys]
    return keys


def summarize(client, runs: list[Any], keys: list[str], ignore: set[str]) -> tuple[list[str], list[dict], dict]:
    """(differing params, one record per run, {run_id: {metric: [(step, value)]}})."""
    # runs without any params (a sweep's parent run) would make every param "differ": left out of the diff
    configured = [r for r in runs if r.data.params] or runs
    all_params = sorted({k for r in configured for k in r.data.params} - ignore)
    differing = [k for k in all_params if len({r.data.params.get(k) for r in configured}) > 1]
    histories: dict[str, dict[str, list[tuple[int, float]]]] = {}
    records = []
    for run in runs:
        rid = run.info.run_id
        histories[rid] = {}
        metrics = {}
        for key in keys:
            hist = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(rid, key))
            histories[rid][key] = [(s, v) for s, _, v in hist]
            finite = [(s, v) for s, _, v in hist if not math.isnan(v)]
            if not finite:
                metrics[key] = {"final": None, "final_step": None, "best": None, "best_step": None}
                continue
            pick = min if lower_is_better(key) else max
            best_step, best = pick(finite, key=lambda sv: sv[1])
            metrics[key] = {"final": hist[-1][2], "final_step": hist[-1][0], "best": best, "best_step": best_step}
        records.append({"run_name": run.info.run_name, "run_id": rid, "experiment_id": run.info.experiment_id,
                        "status": run.info.status, "params": {k: run.data.params.get(k) for k in differing},
                        "metrics": metrics})
    return differing, records, histories


def to_rows(differing: list[str], records: list[dict], keys: list[str]) -> tuple[list[str], list[dict]]:
    columns = ["run", "run_id", *differing]
    for key in keys:
        columns += [key, f"{key} best"]
    rows = []
    for rec in records:
        row = {"run": rec["run_name"], "run_id": rec["run_id"], **rec["params"]}
        for key in keys:
            row[key], row[f"{key} best"] = rec["metrics"][key]["final"], rec["metrics"][key]["best"]
        rows.append(row)
    return columns, rows


def sort_rows(rows: list[dict], columns: list[str], spec: str | None) -> list[dict]:
    if not spec:
        return rows
    column, _, order = spec.rpartition(":") if spec.endswith((":asc", ":desc")) else (spec, "", "asc")
    if column not in columns:
        raise SystemExit(f"sempa-compare: --sort {column!r}: not a column (columns: {', '.join(columns)})")

    def key(row: dict) -> tuple:
        v = row.get(column)
        if v is None:
            return (1, 0, "")
        try:
            return (0, float(v), "")
        except (TypeError, ValueError):
            return (0, 0, str(v))

    present = sorted((r for r in rows if r.get(column) is not None), key=key, reverse=order == "desc")
    return present + [r for r in rows if r.get(column) is None]  # runs without the value last, either way


def _cell(v: Any, short_id: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:8] if short_id else str(v)


def render(columns: list[str], rows: list[dict], fmt: str) -> str:
    """Rows as an aligned text table, GitHub markdown or CSV (json is rendered from the records)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows)
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(r.get(c), short_id=c == "run_id") for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def plot(histories: dict, records: list[dict], keys: list[str], out: str | Path) -> Path:
    """One subplot per metric (that any run has), value against step, one line per run."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no global pyplot state

    keys = [k for k in keys if any(histories[r["run_id"]].get(k) for r in records)]
    if not keys:
        raise SystemExit("sempa-compare: --plot: none of the chosen metrics has values in these runs")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        for rec in records:
            points = histories[rec["run_id"]].get(key) or []
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=rec["run_name"] or rec["run_id"][:8], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    uri, dir_run_ids = args.uri, []
    for d in args.run_dirs:
        state_path = Path(d) / "tracking.json"
        if not state_path.is_file():
            print(f"sempa-compare: {d}: no tracking.json (not a tracked run directory)", file=sys.stderr)
            return 2
        state = json.loads(state_path.read_text())
        uri = uri or state["uri"]
        if state.get("run_id"):
            dir_run_ids.append(state["run_id"])
    from sempa_dist.tracking import open_client, resolve_uri

    uri = resolve_uri(uri)  # else $MLFLOW_TRACKING_URI, else the store sempa-train uses by default
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"sempa-compare: no MLflow store at {uri}", file=sys.stderr)  # sqlite would create an empty one
        return 2
    client = open_client(uri)
    runs = select_runs(client, args, dir_run_ids)
    if not runs:
        print("sempa-compare: no runs match", file=sys.stderr)
        return 1
    keys = metric_keys(runs, args.metrics)
    ignore = {p.strip() for p in args.ignore_params.split(",") if p.strip()}
    differing, records, histories = summarize(client, runs, keys, ignore)
    columns, rows = to_rows(differing, records, keys)
    rows = sort_rows(rows, columns, args.sort)
    if args.format == "json":
        order = {r["run_id"]: i for i, r in enumerate(rows)}
        print(json.dumps(sorted(records, key=lambda rec: order[rec["run_id"]]), indent=2))
    else:
        print(render(columns, rows, args.format))
    if args.plot:
        print(f"plot: {plot(histories, records, keys, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
