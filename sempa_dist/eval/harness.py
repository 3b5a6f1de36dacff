"""Standard generation benchmarks through lm-evaluation-harness (the optional extra ``lm-eval``).

SemPA's claim is that sentence-level DPO improves embeddings *while keeping generation*; the paper
checks the latter with lm-evaluation-harness (MMLU 5-shot, GSM8K-CoT 8-shot, DROP 3-shot,
TruthfulQA-MC1 and HellaSwag 0-shot). This module runs the harness's Python API
(``lm_eval.simple_evaluate`` with an ``HFLM``) on HF model directories, several models side by side
(the reference, i.e. a run's base model, and the trained export), and turns the harness's result
dict into plain ``{task: {metric: value}}`` tables that can be printed, written as JSON and logged.

Few-shot counts are per task (``mmlu:5,gsm8k_cot:8``): the harness's ``num_fewshot`` is one number
for a whole call, so tasks are grouped by their count and evaluated one call per group, on the same
loaded model. A task given without a count keeps the default of its yaml (0 when the yaml sets none):
in lm-eval 0.4.13 that is 0 for mmlu, drop and hellaswag, 8 for gsm8k_cot, and a fixed 0 for
truthfulqa_mc1 (its yaml pins 0 and the harness ignores overrides of a pinned 0). The paper's
settings differ for mmlu and drop, hence the ``paper`` preset.

The NLL/KL check (`sempa_dist.eval.generation`) stays the offline default: these tasks download
their data from the hub, which clusters can do and the test machines cannot.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'sempa-dist[lm-eval]'"
# The paper's generation benchmarks and shot counts (SemPA, "Generation ability" evaluation).
PAPER_TASKS = "mmlu:5,gsm8k_cot:8,drop:3,truthfulqa_mc1:0,hellaswag:0"
PRESETS = {"paper": PAPER_TASKS}
# numbers in a harness result entry that are not scores: the document count (kept as n_samples)
NOT_METRICS = {"sample_len"}


class LmEvalUnavailable(ImportError):
    """lm-evaluation-harness is not installed; the message is the one line to fix it."""


class HarnessTaskError(ValueError):
    """A --lm-eval task list that cannot run: bad syntax, or a name no task directory defines."""


def require_lm_eval() -> str:
    """The installed lm-eval version; raises LmEvalUnavailable (with the install line) without it.

    Checked before any model loads, so a missing optional extra costs a line, not an STS run."""
    if importlib.util.find_spec("lm_eval") is None:
        raise LmEvalUnavailable(f"lm-evaluation-harness is not installed: {INSTALL_HINT}")
    from importlib.metadata import version

    return version("lm_eval")


@dataclass(frozen=True)
class TaskSpec:
    """One requested task (or group, or tag) and its few-shot count; None: the yaml's default."""

    name: str
    num_fewshot: int | None = None

    def __str__(self) -> str:
        return self.name if self.num_fewshot is None else f"{self.name}:{self.num_fewshot}"


def parse_task_specs(text: str) -> list[TaskSpec]:
    """``'mmlu:5,gsm8k_cot,hellaswag:0'`` (or a preset name, ``paper``) -> task specs, in order.

    Raises HarnessTaskError on an empty list, a count that is not an integer >= 0, or a task named
    twice (its two results would overwrite each other)."""
    items = [t.strip() for t in PRESETS.get(text.strip().lower(), text).split(",") if t.strip()]
    if not items:
        raise HarnessTaskError(f"--lm-eval {text!r} names no task")
    specs: list[TaskSpec] = []
    for item in items:
        name, sep, shots = (s.strip() for s in item.rpartition(":")) if ":" in item else (item, "", "")
        if not name:
            raise HarnessTaskError(f"--lm-eval: {item!r} has no task name")
        count = None
        if sep:
            try:
                count = int(shots)
            except ValueError:
                count = -1
            if count < 0:
                raise HarnessTaskError(f"--lm-eval: few-shot count of {name!r} must be an integer >= 0, got {shots!r}")
        if any(s.name == name for s in specs):
            raise HarnessTaskError(f"--lm-eval: task {name!r} is named twice")
        specs.append(TaskSpec(name, count))
    return specs


def task_manager(specs: Sequence[TaskSpec], tasks_dir: str | Path | None = None):
    """A TaskManager that knows every task in `specs`; raises HarnessTaskError naming the unknown ones.

    Indexing the harness's own ~15k task yamls takes seconds; when `tasks_dir` alone defines every
    requested task (the local tasks of a test or a quick check), that index is skipped."""
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise HarnessTaskError(f"--lm-eval-tasks-dir {tasks_dir}: not a directory")
        local = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if all(s.name in local.all_tasks for s in specs):
            return local
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir is not None else None)
    unknown = [s.name for s in specs if s.name not in manager.all_tasks]
    if unknown:
        where = f" nor in {tasks_dir}" if tasks_dir is not None else ""
        raise HarnessTaskError(f"--lm-eval: unknown task(s) {', '.join(unknown)}: not in lm-eval's task list{where} "
                               "(`lm-eval ls tasks` lists them)")
    return manager


def metric_name(key: str) -> str:
    """lm-eval's 'metric,filter' key as a name MLflow accepts: 'acc,none' -> 'acc',
    'exact_match,strict-match' -> 'exact_match/strict-match' (commas are not allowed in MLflow keys)."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The harness's ``results`` section -> {task: {metric: value}}, numbers only (it writes 'N/A'
    for a stderr it could not compute, and each entry carries its 'name' and display 'alias')."""
    out: dict[str, dict[str, float]] = {}
    for task, entries in results.items():
        out[task] = {metric_name(k): float(v) for k, v in entries.items()
                     if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def top_level(results: Mapping[str, Any], group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    """Entries that are nobody's subtask: what was asked for, with a group's (mmlu's 57 subjects,
    its 4 categories) rolled up into the group and a tag expanded into its tasks."""
    children = {c for subs in group_subtasks.values() for c in subs}
    return [t for t in results if t not in children]


def run_harness(model: str | Path, specs: Sequence[TaskSpec], *, limit: int | float | None = None,
                tasks_dir: str | Path | None = None, manager=None, batch_size: int | str = 8,
                device: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Evaluate one HF model directory (or hub id) on `specs` with lm-eval.

    Returns ``{"metrics": {task: {metric: value}}`` (every task and group the harness reported),
    ``"n_shot": {task: int}``, ``"n_samples": {task: docs evaluated}`` (after `limit`),
    ``"top_level": [task, ...]}`` (the rows worth a table). `limit`: at most that many documents per
    task (a fraction < 1: that share), for quick checks; scores on a subsample are not comparable to
    published ones. `device`: default SEMPA_DEVICE's choice (cuda when visible)."""
    require_lm_eval()
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from sempa_dist.distributed import device_type

    manager = manager or task_manager(specs, tasks_dir)
    device = device or device_type()
    lm = HFLM(pretrained=str(model), dtype=dtype, device=device, batch_size=batch_size)
    metrics: dict[str, dict[str, float]] = {}
    n_shot: dict[str, int] = {}
    n_samples: dict[str, int] = {}
    tops: dict[str, int] = {}  # top-level entry -> position of its request in `specs`
    order = {spec.name: i for i, spec in enumerate(specs)}
    try:
        # one harness call per few-shot count, in the order the counts first appear
        by_shots: dict[int | None, list[str]] = {}
        for spec in specs:
            by_shots.setdefault(spec.num_fewshot, []).append(spec.name)
        for shots, names in by_shots.items():
            res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                                         log_samples=False, batch_size=batch_size, device=device)
            if res is None:  # only a non-zero rank of a multi-process harness run gets None; we run one
                raise RuntimeError("lm-eval returned no results")
            metrics.update(flatten_results(res["results"]))
            n_shot.update({k: int(v) for k, v in res.get("n-shot", {}).items()})
            n_samples.update({k: int(v.get("effective", v.get("original", 0))) if isinstance(v, Mapping) else int(v)
                              for k, v in res.get("n-samples", {}).items()})
            # a tag's tasks are not requested by name: they sit where the call's first request does
            first = min(order[n] for n in names)
            tops.update({t: order.get(t, first) for t in top_level(res["results"], res.get("group_subtasks", {}))})
    finally:
        # the side-by-side caller loads the next model right after: free this one first
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # in the order asked for (`mmlu:5,hellaswag:0,drop:5` runs drop with mmlu), not the order of the calls
    return {"metrics": metrics, "n_shot": n_shot, "n_samples": n_samples,
            "top_level": sorted(tops, key=tops.__getitem__)}


def compare(models: Mapping[str, str | Path], specs: Sequence[TaskSpec], *, limit: int | float | None = None,
            tasks_dir: str | Path | None = None, manager=None, batch_size: int | str = 8, device: str | None = None,
            dtype: str = "float32") -> dict[str, Any]:
    """Run the same tasks on each of `models` ({label: model dir}, e.g. reference and trained), one
    model in memory at a time. Returns a JSON-able report: ``results`` {label: {task: {metric:
    value}}}, ``models`` {label: path}, the task list, few-shot counts, sample counts, top-level
    tasks, `limit` and the lm-eval version. `manager`: a `task_manager(specs, tasks_dir)` already
    built (the caller checked the names with it), else one is built here."""
    version = require_lm_eval()
    manager = manager or task_manager(specs, tasks_dir)  # once for all models: the default index takes seconds
    report: dict[str, Any] = {"tasks": [str(s) for s in specs], "limit": limit, "lm_eval_version": version,
                              "models": {label: str(path) for label, path in models.items()}, "results": {}}
    for label, path in models.items():
        one = run_harness(path, specs, limit=limit, manager=manager, batch_size=batch_size, device=device,
                          dtype=dtype)
        report["results"][label] = one["metrics"]
        # the same tasks and settings for every model: the first model's counts stand for all
        report.setdefault("n_shot", one["n_shot"])
        report.setdefault("n_samples", one["n_samples"])
        report.setdefault("top_level", one["top_level"])
    return report


def stderr_name(metric: str) -> str:
    """The name `metric_name` gives the harness's stderr of `metric`: 'acc' -> 'acc_stderr',
    'exact_match/strict-match' -> 'exact_match_stderr/strict-match'."""
    base, sep, filt = metric.partition("/")
    return f"{base}_stderr{sep}{filt}"


def _is_stderr(metric: str) -> bool:
    return metric.partition("/")[0].endswith("_stderr")


def _cell(metrics: Mapping[str, float], metric: str) -> str:
    if metric not in metrics:
        return "-"
    value, err = metrics[metric], metrics.get(stderr_name(metric))
    return f"{value:.4f}" if err is None or not math.isfinite(err) else f"{value:.4f} ± {err:.4f}"


def format_table(report: Mapping[str, Any]) -> str:
    """Markdown table of the top-level tasks: one column per model, and the change (last model minus
    first) when there are two or more. Stderr rows are folded into their metric's cell."""
    labels = list(report["results"])
    first, last = report["results"][labels[0]], report["results"][labels[-1]]
    delta = len(labels) > 1
    head = ["task", "n-shot", "metric", *labels, *(["change"] if delta else [])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in report["top_level"]:
        names = dict.fromkeys(m for lab in labels for m in report["results"][lab].get(task, {}) if not _is_stderr(m))
        for metric in names:
            cells = [_cell(report["results"][lab].get(task, {}), metric) for lab in labels]
            change = []
            if delta:
                a, b = first.get(task, {}).get(metric), last.get(task, {}).get(metric)
                change = [f"{b - a:+.4f}" if a is not None and b is not None else "-"]
            shots = report.get("n_shot", {}).get(task, "")
            rows.append("| " + " | ".join([task, str(shots), metric, *cells, *change]) + " |")
    return "\n".join(rows)


def mlflow_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric names for MLflow: ``lm_eval/<label>/<task>/<metric>``, every task (subtasks too)."""
    return {re.sub(r"[^/\w.\- ]", "_", f"lm_eval/{label}/{task}/{metric}")[:250]: value
            for label, tasks in report["results"].items()
            for task, metrics in tasks.items() for metric, value in metrics.items() if math.isfinite(value)}
