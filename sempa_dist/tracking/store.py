"""The MLflow store: where it is, a client for it, the run in it, sending entries to it, and
replaying a run directory's held-back entries into it.

Entries ("ops") are JSON-able dicts, so they can be journaled and replayed:

    {"op": "params"|"tags", "data": {key: str}}   {"op": "metrics", "data": [[key, value, ts_ms, step]]}
    {"op": "artifact", "path": local file, "dir": artifact dir or null}   {"op": "status", "status", "time"}

Sending them again is harmless: MLflow keeps one copy of an identical metric, param or tag.
MLflow itself is imported only when a store is opened: importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sempa_dist.config import TrainConfig
from sempa_dist.redaction import redact_text
from sempa_dist.tracking import rundir

MAX_METRICS, MAX_PARAMS_TAGS = 1000, 100  # MLflow's per-call limits for log_batch
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000  # MLflow's value length limits
# MLflow's defaults retry a dead server for minutes (7 retries, backoff factor 2, 120 s timeout);
# the sender thread retries on its own schedule instead
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# store errors that mean "this entry is bad" rather than "the store is away": dropped, not retried
REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"}
STORE_DB = "mlflow.db"  # the embedded store's file, in the folder that holds the run directories


def say(msg: str) -> None:
    """One line of tracking news on stderr (stdout is the training log's)."""
    print(f"[tracking] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Where the store is


def resolve_uri(uri: str | None = None, output_dir: str | Path | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else the embedded store beside the run directory,
    sqlite:///<output_dir>/../mlflow.db (absolute). Without `output_dir` (the command line, sempa-compare):
    the store of the default run directory (train.output_dir's default, runs/default: runs/mlflow.db),
    so training and the tools that read its runs share one default."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if output_dir is None:
        output_dir = TrainConfig.output_dir  # the dataclass field's default
    return "sqlite:///" + str(Path(output_dir).resolve().parent / STORE_DB)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def _local_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store next to its database (MLflow would use ./mlruns in the cwd)."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment)).as_uri() if db else None


# ----------------------------------------------------------------------------------------------
# A client and the run


def open_client(uri: str) -> Any:
    """An MlflowClient for `uri` with short HTTP timeouts and retries (unless set in the environment)."""
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one line of ours instead
    for name in ("alembic", "mlflow.store.db.utils"):  # a new sqlite store logs each schema migration
        logging.getLogger(name).setLevel(logging.WARNING)
    db = _sqlite_path(uri)
    if db:
        db.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(uri, name))
        except MlflowException:  # another job created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":  # a deleted experiment still holds its name
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def ensure_run(client: Any, uri: str, experiment: str, run_id: str | None, run_name: str | None,
               tags: dict[str, str], reopen: bool) -> str:
    """`run_id` if that run is in this store (set RUNNING again when `reopen`), else a new run's id."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            say(f"run {run_id} is not in {redact_text(uri)}: starting a new run")
        else:
            if run.info.lifecycle_stage == "deleted":
                client.restore_run(run_id)
            if reopen and run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return run_id
    exp_id = _experiment_id(client, uri, experiment)
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


# ----------------------------------------------------------------------------------------------
# Sending


def send(client: Any, run_id: str, ops: list[dict[str, Any]]) -> None:
    """Send `ops` to run `run_id` in batches. Raises when the store cannot be reached; entries the
    store rejects (bad values) are dropped with a warning so they cannot block the rest forever."""
    from mlflow.entities import Metric, RunTag

    params: dict[str, str] = {}
    tags: dict[str, str] = {}
    metrics: list[Metric] = []
    artifacts: dict[tuple[str, str | None], None] = {}
    status = None
    for op in ops:
        kind = op.get("op")
        if kind == "params":
            params.update(op["data"])
        elif kind == "tags":
            tags.update(op["data"])
        elif kind == "metrics":
            metrics += [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["data"]]
        elif kind == "artifact":
            artifacts[(op["path"], op.get("dir"))] = None
        elif kind == "status":
            status = op
    items = list(params.items())
    for i in range(0, len(items), MAX_PARAMS_TAGS):
        _send_params(client, run_id, dict(items[i : i + MAX_PARAMS_TAGS]))
    items = list(tags.items())
    for i in range(0, len(items), MAX_PARAMS_TAGS):
        _guarded(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in items[i : i + MAX_PARAMS_TAGS]])
    for i in range(0, len(metrics), MAX_METRICS):
        _guarded(client.log_batch, run_id, metrics=metrics[i : i + MAX_METRICS])
    for path, folder in artifacts:
        if Path(path).is_file():
            _guarded(client.log_artifact, run_id, path, folder)
        else:
            say(f"artifact {path} no longer exists: not logged")
    if status is not None:
        if status["status"] == "RUNNING":
            _guarded(client.update_run, run_id, status="RUNNING")
        else:
            _guarded(client.set_terminated, run_id, status["status"], end_time=status.get("time"))


def _is_rejection(e: Exception) -> bool:
    return getattr(e, "error_code", None) in REJECTED


def _guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:
        if not _is_rejection(e):
            raise
        say(f"the store rejected an entry ({str(e)[:300]}): dropped")


def _send_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    """MLflow params are write-once: a resumed run keeps the first value of a changed param and
    records the new one as a tag `resume.<key>`."""
    from mlflow.entities import Param, RunTag

    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        return
    except Exception as e:
        if not _is_rejection(e):
            raise
    old = client.get_run(run_id).data.params
    changed = {k: v for k, v in params.items() if k in old and old[k] != v}
    new = [Param(k, v) for k, v in params.items() if k not in old]
    if changed:
        say(f"params changed since this run started (kept as tags resume.<key>): {', '.join(sorted(changed))}")
    _guarded(client.log_batch, run_id, params=new, tags=[RunTag(f"resume.{k}", v) for k, v in changed.items()])


# ----------------------------------------------------------------------------------------------
# Replay


def replay(run_dir: str | Path, uri: str | None = None, journal: bool = False) -> tuple[str, int]:
    """Send a run directory's pending entries (all of its journal with `journal`) to `uri` (default:
    the run's own store). Returns (run id, values sent). Idempotent: values already there stay single."""
    run_dir = Path(run_dir)
    state = rundir.read_state(run_dir)
    if not state:
        raise FileNotFoundError(f"{run_dir / rundir.STATE}: not a tracked run directory")
    target = uri or state["uri"]
    own = target == state["uri"]
    ops = rundir.read_jsonl(run_dir / (rundir.JOURNAL if journal else rundir.PENDING))
    client = open_client(target)
    tags = {"mlflow.parentRunId": state["parent_run_id"]} if state.get("parent_run_id") and own else {}
    run_id = ensure_run(client, target, state["experiment"], state.get("run_id"), state.get("run_name"), tags, False)
    send(client, run_id, ops)
    if own:
        (run_dir / rundir.PENDING).unlink(missing_ok=True)
        state.update(run_id=run_id, unsent=0)
        rundir.write_state(run_dir, state)
    return run_id, rundir.count_values(ops)
