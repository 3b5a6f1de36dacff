"""Experiment tracking in MLflow: from rank 0 only, and never in the way of training.

Where: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded store next to the run
directory, ``sqlite:///<output_dir>/../mlflow.db`` (no server), whose experiments keep their
artifacts in ``<output_dir>/../mlartifacts/<experiment>``.

How: the loop hands metrics to a `Tracker`, which buffers them; a background thread sends them with
``MlflowClient.log_batch`` (at most 1000 metrics, 100 params, 100 tags a call) every
``tracking.flush_every_s`` seconds, so neither a slow nor a dead server can stall a step. Every
entry is also appended to ``<output_dir>/mlflow_journal.jsonl``. What the store did not take is kept
in ``<output_dir>/mlflow_pending.jsonl`` and retried with back-off until it does. If the store is
still down when the run ends, a note says so and the whole run is written to a local fallback store
(``sqlite:///<output_dir>/mlflow_fallback.db``); ``python -m sempa_dist.tracking replay RUN_DIR``
sends the pending entries once the server is back.

Resume: the run id is kept in ``<output_dir>/tracking.json`` and in every checkpoint's trainer
state; a job resuming from one of this directory's checkpoints continues that MLflow run.

Secrets: anything under a name like TOKEN, KEY, SECRET, PASSWORD or CREDENTIAL, and text that
looks like a token (or equals a secret environment variable's value), is masked before it is
logged as a param, tag or artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import numbers
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from sempa_dist.fileio import write_atomic
from sempa_dist.preemption import Preempted
from sempa_dist.redaction import REDACTED, redact, redact_text, secret_env_values  # noqa: F401 (REDACTED: re-exported)

JOURNAL, PENDING, STATE = "mlflow_journal.jsonl", "mlflow_pending.jsonl", "tracking.json"
FALLBACK_DB, ARTIFACTS = "mlflow_fallback.db", "mlflow_artifacts"
MAX_METRICS, MAX_PARAMS_TAGS = 1000, 100  # MLflow's per-call limits for log_batch
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000  # MLflow's value length limits
# MLflow's defaults retry a dead server for minutes (7 retries, backoff factor 2, 120 s timeout);
# the sender thread retries on its own schedule instead
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# store errors that mean "this entry is bad" rather than "the store is away": dropped, not retried
REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"}
REPO = Path(__file__).resolve().parents[1]



def _say(msg: str) -> None:
    print(f"[tracking] {msg}", file=sys.stderr, flush=True)


def _safe(fn):
    """Tracking problems are reported, never raised into the training loop (nor over its exception)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            _say(f"WARNING: {fn.__name__} failed ({type(e).__name__}: {redact_text(str(e))[:300]}); training goes on")
            return None

    return wrapper


# ----------------------------------------------------------------------------------------------
# Where the run goes, and what describes it


def resolve_uri(uri: str | None, output_dir: str | Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path(output_dir).resolve().parent / "mlflow.db")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def _local_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store next to its database (MLflow would use ./mlruns in the cwd)."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment)).as_uri() if db else None


def git_info(path: Path = REPO) -> dict[str, str]:
    """Commit and dirty flag (tracked files changed) of the checkout holding this code."""
    if not (path / ".git").exists():
        return {"git.commit": "not a git checkout"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"git.commit": f"unknown ({type(e).__name__})"}
    if head.returncode != 0:
        return {"git.commit": "unknown (no commit)"}
    commit = head.stdout.strip()
    return {"git.commit": commit, "mlflow.source.git.commit": commit,
            "git.dirty": str(bool(status.stdout.strip())).lower()}


def accelerator_name() -> str:
    """GPU model and count on CUDA machines, else the CPU model and core count."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return f"cpu: {model} ({os.cpu_count()} cores)"


def node_list(dist) -> list[str]:
    """Hostnames of every rank, deduplicated in rank order. Collective when the world has several ranks."""
    hosts = [socket.gethostname()]
    torch = sys.modules.get("torch")
    if dist.world_size > 1 and torch is not None and torch.distributed.is_initialized():
        hosts = [None] * dist.world_size
        torch.distributed.all_gather_object(hosts, socket.gethostname())
    return list(dict.fromkeys(hosts))


def _text(v: Any, limit: int = MAX_PARAM_LEN) -> str:
    """A param/tag value: text as is, anything else as JSON (null, true, [..]), cut at MLflow's limit."""
    return (v if isinstance(v, str) else json.dumps(v, default=str))[:limit]


def _key(k: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . / and spaces)."""
    return re.sub(r"[^/\w.\- ]", "_", str(k))[:250]


# ----------------------------------------------------------------------------------------------
# Talking to a store. Entries ("ops") are JSON-able dicts, so they can be journaled and replayed:
#   {"op": "params"|"tags", "data": {key: str}}   {"op": "metrics", "data": [[key, value, ts_ms, step]]}
#   {"op": "artifact", "path": local file, "dir": artifact dir or null}   {"op": "status", "status", "time"}
# Sending them again is harmless: MLflow keeps one copy of an identical metric, param or tag.


def open_client(uri: str):
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


def _experiment_id(client, uri: str, name: str) -> str:
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


def _ensure_run(client, uri: str, experiment: str, run_id: str | None, run_name: str | None,
                tags: dict[str, str], reopen: bool) -> str:
    """`run_id` if that run is in this store (set RUNNING again when `reopen`), else a new run's id."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            _say(f"run {run_id} is not in {redact_text(uri)}: starting a new run")
        else:
            if run.info.lifecycle_stage == "deleted":
                client.restore_run(run_id)
            if reopen and run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return run_id
    exp_id = _experiment_id(client, uri, experiment)
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def _is_rejection(e: Exception) -> bool:
    return getattr(e, "error_code", None) in REJECTED


def _send(client, run_id: str, ops: list[dict[str, Any]]) -> None:
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
            _say(f"artifact {path} no longer exists: not logged")
    if status is not None:
        if status["status"] == "RUNNING":
            _guarded(client.update_run, run_id, status="RUNNING")
        else:
            _guarded(client.set_terminated, run_id, status["status"], end_time=status.get("time"))


def _guarded(fn, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:
        if not _is_rejection(e):
            raise
        _say(f"the store rejected an entry ({str(e)[:300]}): dropped")


def _send_params(client, run_id: str, params: dict[str, str]) -> None:
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
        _say(f"params changed since this run started (kept as tags resume.<key>): {', '.join(sorted(changed))}")
    _guarded(client.log_batch, run_id, params=new, tags=[RunTag(f"resume.{k}", v) for k, v in changed.items()])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    ops = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash mid-write
            ops.append(json.loads(line))
    return ops


def _append_jsonl(path: Path, ops: list[dict[str, Any]]) -> None:
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(op) + "\n" for op in ops))
        fh.flush()


def _count_values(ops: list[dict[str, Any]]) -> int:
    return sum(len(op.get("data", ())) if op.get("op") != "artifact" else 1 for op in ops)


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(run_dir / STATE, json.dumps(state, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Trackers


def _exit_status(exc: BaseException | None) -> str | None:
    """MLflow status for leaving a tracked block: None keeps the run RUNNING (preempted: requeued)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, Preempted):
        return None
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


class NullTracker:
    """The tracker's interface, doing nothing: what ranks other than 0 get, and every rank when
    tracking.enabled is false. A context manager: leaving the block ends the run."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log run parameters (values as text, secrets masked)."""

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (secrets masked)."""

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Queue numeric `metrics` at `step` (other values and the key 'step' are ignored)."""

    def log_dict(self, name: str, data: Any) -> None:
        """Log `data` (secrets masked) as artifact `name` (.yaml/.yml as YAML, else JSON)."""

    def log_dataset(self, load_report: Any, tok_report: Any) -> None:
        """Dataset fingerprint and counts (read, kept, dropped by reason, truncated) as params + artifact."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The end-of-run summary: its numbers as metrics `summary/*`, the whole as summary.json."""

    def flush(self, wait: bool = True, timeout: float | None = 60.0) -> bool:
        """Send what is queued; with `wait`, block until done. True when nothing is left unsent."""
        return True

    def finish(self, status: str | None = "FINISHED") -> None:
        """End the run with `status` (None: leave it RUNNING) after a last flush."""

    def child(self, run_name: str, run_dir: str | Path | None = None) -> NullTracker:
        """A nested run under this one (a sweep's trial)."""
        return NullTracker()

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.finish(_exit_status(exc))


class Tracker(NullTracker):
    """One MLflow run, fed from the training loop; a background thread does all store traffic.

    `run_dir` holds tracking.json, the journal, the pending entries and the artifacts' redacted copies.
    """

    def __init__(self, uri: str, experiment: str, run_dir: str | Path, run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, flush_every_s: float = 10.0,
                 reopen: bool = False, finish_timeout_s: float = 90.0, retry_s: float = 5.0) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.parent_run_id = run_id, parent_run_id
        self.flush_every_s, self.finish_timeout_s, self.retry_s = flush_every_s, finish_timeout_s, retry_s
        self._reopen = reopen
        self._journal, self._pending = self.run_dir / JOURNAL, self.run_dir / PENDING
        self._env_secrets = secret_env_values()
        self._client = None
        self._connected = False
        self._ops: list[dict[str, Any]] = []
        self._buffered = 0
        self._last_step = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._requested = self._completed = 0
        self._stopping = self._finished = False
        self._failures, self._retry_at = 0, 0.0
        self._down_since_step: int | None = None
        self._last_error = ""
        self._cpu_sampler = _cpu_sampler()
        if reopen:  # a resumed run: RUNNING again, after any status an earlier job left pending
            self._ops.append({"op": "status", "status": "RUNNING", "time": int(time.time() * 1000)})
        self._save_state()
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # -- the loop's side: queue, never block ------------------------------------------------------

    def _queue(self, op: dict[str, Any], n: int = 1) -> None:
        with self._lock:
            self._ops.append(op)
            self._buffered += n
            full = self._buffered >= MAX_METRICS
        if full or self.flush_every_s <= 0:
            self._wake.set()

    @_safe
    def log_params(self, params: dict[str, Any]) -> None:
        clean = redact(params, env_secrets=self._env_secrets)
        self._queue({"op": "params", "data": {_key(k): _text(v) for k, v in clean.items()}})

    @_safe
    def set_tags(self, tags: dict[str, Any]) -> None:
        clean = redact(tags, env_secrets=self._env_secrets)
        self._queue({"op": "tags", "data": {_key(k): _text(v, MAX_TAG_LEN) for k, v in clean.items()}})

    @_safe
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        ts = int(time.time() * 1000)
        data = [[_key(k), float(v), ts, int(step)] for k, v in metrics.items()
                if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)]
        self._last_step = max(self._last_step, int(step))
        if data:
            self._queue({"op": "metrics", "data": data}, len(data))

    @_safe
    def log_dict(self, name: str, data: Any) -> None:
        path = self.run_dir / ARTIFACTS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = redact(data, env_secrets=self._env_secrets)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(clean, sort_keys=False))
        else:
            path.write_text(json.dumps(clean, indent=2, default=str))
        folder = str(Path(name).parent)
        self._queue({"op": "artifact", "path": str(path.resolve()), "dir": None if folder == "." else folder})

    @_safe
    def log_dataset(self, load_report: Any, tok_report: Any) -> None:
        load, tok = _as_dict(load_report), _as_dict(tok_report)
        params = {"dataset.source": load.get("source"), "dataset.fingerprint": tok.get("fingerprint"),
                  "dataset.rows_read": load.get("rows_read"), "dataset.kept": tok.get("kept"),
                  "dataset.truncated": tok.get("truncated"), "dataset.dropped_overlong": tok.get("dropped_overlong")}
        params.update({f"dataset.dropped.{k}": v for k, v in (load.get("dropped") or {}).items()})
        self.log_params({k: v for k, v in params.items() if v is not None})
        self.log_dict("dataset.json", {"load": load, "tokenize": tok})

    @_safe
    def log_summary(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("steps") or self._last_step)
        numbers_ = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, numbers.Real)}
        self.log_metrics(numbers_, step)
        self.log_dict("summary.json", summary)

    def child(self, run_name: str, run_dir: str | Path | None = None) -> Tracker:
        self.flush()  # the parent's run id must exist before the child is tagged with it
        return Tracker(self.uri, self.experiment, run_dir or self.run_dir / "children" / run_name, run_name=run_name,
                       parent_run_id=self.run_id, flush_every_s=self.flush_every_s)

    @_safe
    def flush(self, wait: bool = True, timeout: float | None = 60.0) -> bool:
        with self._cond:
            self._requested += 1
            target = self._requested
        self._wake.set()
        if not wait:
            return False
        with self._cond:
            self._cond.wait_for(lambda: self._completed >= target or not self._thread.is_alive(), timeout)
        return self._completed >= target and self._connected and not self._pending.exists()

    @_safe
    def finish(self, status: str | None = "FINISHED") -> None:
        if self._finished:
            return
        self._finished = True
        if status is not None:
            self._queue({"op": "status", "status": status, "time": int(time.time() * 1000)})
        self._stopping = True
        self._wake.set()
        self._thread.join(self.finish_timeout_s)
        hung = self._thread.is_alive()
        unsent = _count_values(_read_jsonl(self._pending))
        state = self._save_state(status=status or "RUNNING", unsent=unsent)
        where = f"{redact_text(self.uri)} (experiment {self.experiment!r})"
        if not hung and not unsent:
            _say(f"run {self.run_id} [{status or 'RUNNING'}] in {where}")
            return
        since = f" since step {self._down_since_step}" if self._down_since_step is not None else ""
        _say(f"NOTE: the tracking store {where} was unreachable{since} ({self._last_error}).")
        if status is None:  # preempted: the requeued job sends them
            _say(f"  {unsent} values wait in {self._pending}; the resumed job sends them.")
            return
        if hung:
            _say(f"  the last send did not return within {self.finish_timeout_s:.0f} s; replay with --journal.")
        fb = self._write_fallback(state)
        _say(f"  nothing is lost: {unsent} unsent values are kept in {self._pending}" +
             (f"; the whole run is also in the local store {fb}" if fb else "") + ".")
        _say(f"  send them once the server is back: python -m sempa_dist.tracking replay {self.run_dir}")

    # -- the sender thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.flush_every_s if self.flush_every_s > 0 else None)
            self._wake.clear()
            final = self._stopping
            with self._cond:
                target = self._requested
            try:
                self._flush_once(final)
            except Exception as e:  # a bug here must not kill the sender silently
                self._last_error = f"{type(e).__name__}: {e}"
                _say(f"internal error while sending: {self._last_error}")
            with self._cond:
                self._completed = target
                self._cond.notify_all()
            if final:
                return

    def _flush_once(self, final: bool) -> None:
        with self._lock:
            ops, self._ops, self._buffered = self._ops, [], 0
        system = self._system_metrics() if ops else None
        if system:
            ops.append(system)
        if ops:
            _append_jsonl(self._journal, ops)  # the full record: a fallback store is built from it
        if not final and time.monotonic() < self._retry_at:  # the store is away: don't knock every step
            if ops:
                _append_jsonl(self._pending, ops)
            return
        try:
            if not self._connected:
                self._connect()
            pending = _read_jsonl(self._pending)
            _send(self._client, self.run_id, pending + ops)
        except Exception as e:
            if ops:
                _append_jsonl(self._pending, ops)
            self._failed(e)
            return
        self._pending.unlink(missing_ok=True)
        self._failures, self._retry_at = 0, 0.0
        if self._down_since_step is not None:
            _say(f"the tracking store is reachable again: {_count_values(pending)} held-back values sent")
            self._down_since_step = None

    def _connect(self) -> None:
        if self._client is None:
            self._client = open_client(self.uri)
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        self.run_id = _ensure_run(self._client, self.uri, self.experiment, self.run_id, self.run_name, tags, self._reopen)
        self._connected = True
        self._save_state()

    def _failed(self, e: Exception) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + min(300.0, self.retry_s * 2 ** (self._failures - 1))  # back off
        self._last_error = _short_error(e)
        if self._down_since_step is None:
            self._down_since_step = self._last_step
            _say(f"WARNING: cannot reach the tracking store {redact_text(self.uri)} ({self._last_error}). "
                 f"Training goes on; values are kept in {self._pending} and sent when it is back.")

    def _system_metrics(self) -> dict[str, Any] | None:
        """CPU, memory and GPU memory of this node (MLflow's system metric names), at the last step."""
        values: dict[str, float] = {}
        try:
            import psutil

            vm = psutil.virtual_memory()
            values.update({"system/cpu_utilization_percentage": self._cpu_sampler(),
                           "system/system_memory_usage_megabytes": vm.used / 2**20,
                           "system/system_memory_usage_percentage": vm.percent,
                           "system/process_rss_megabytes": psutil.Process().memory_info().rss / 2**20})
        except Exception:  # psutil missing or /proc unreadable: no system metrics, not an error
            pass
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                values[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.memory_reserved(i) / 2**20
        ts = int(time.time() * 1000)
        data = [[k, float(v), ts, self._last_step] for k, v in values.items() if v is not None]
        return {"op": "metrics", "data": data} if data else None

    # -- bookkeeping ---------------------------------------------------------------------------

    def _save_state(self, **extra: Any) -> dict[str, Any]:
        state = _read_state(self.run_dir)
        state.update({"uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                      "run_id": self.run_id, "parent_run_id": self.parent_run_id, **extra})
        with contextlib.suppress(OSError):
            _write_state(self.run_dir, state)
        return state

    def _write_fallback(self, state: dict[str, Any]) -> str | None:
        """The whole journal into a sqlite store in the run directory; returns 'URI (run ID)'."""
        uri = "sqlite:///" + str((self.run_dir / FALLBACK_DB).resolve())
        try:
            client = open_client(uri)
            fb = state.get("fallback") or {}
            tags = {"sempa.fallback_for": f"{redact_text(self.uri)} run {self.run_id}"}
            run_id = _ensure_run(client, uri, self.experiment, fb.get("run_id"), self.run_name, tags, reopen=False)
            _send(client, run_id, _read_jsonl(self._journal))
        except Exception as e:
            _say(f"  the fallback store {uri} failed too ({type(e).__name__}: {e}); the journal {self._journal} "
                 "has everything")
            return None
        self._save_state(fallback={"uri": uri, "run_id": run_id})
        return f"{uri} (run {run_id})"


def _short_error(e: Exception) -> str:
    """'connection refused' rather than a page of urllib3 text."""
    text = redact_text(str(e))
    for needle, short in (("Connection refused", "connection refused"), ("NewConnectionError", "cannot connect"),
                          ("timed out", "timed out"), ("Name or service not known", "unknown host"),
                          ("database is locked", "database is locked")):
        if needle in text:
            return short
    return f"{type(e).__name__}: {text[:200]}"


def _as_dict(report: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    return dict(report or {})


def _cpu_sampler():
    """cpu_percent since the previous call (its first call only starts the interval)."""
    try:
        import psutil

        psutil.cpu_percent(None)
        return lambda: psutil.cpu_percent(None)
    except Exception:
        return lambda: None


# ----------------------------------------------------------------------------------------------
# Entry points


def start(cfg, dist, kind: str = "train") -> NullTracker:
    """The run's tracker. Collective (the node list is gathered): every rank calls it. Rank 0 gets a
    `Tracker` with the config (flattened params + config.yaml), git state, hosts and run tags queued;
    the other ranks, and every rank when tracking is disabled, a `NullTracker`."""
    if not cfg.tracking.enabled:
        return NullTracker()
    nodes = node_list(dist)
    if not dist.is_main:
        return NullTracker()
    from sempa_dist.config import flatten

    out_dir = Path(cfg.train.output_dir)
    run_id, resumed_from = _resumed_run_id(cfg, out_dir)
    tracker = Tracker(resolve_uri(cfg.tracking.uri, out_dir), cfg.tracking.experiment, out_dir,
                      run_name=cfg.tracking.run_name or out_dir.resolve().name, run_id=run_id,
                      parent_run_id=cfg.tracking.parent_run_id, flush_every_s=cfg.tracking.flush_every_s,
                      reopen=run_id is not None)
    tags = {"model": cfg.model.name, "ref_mode": cfg.ref.mode, "loss_type": cfg.loss.type, "run_kind": kind,
            "nodes": ",".join(nodes), "accelerator": accelerator_name(), **git_info()}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if resumed_from:
        tags["resumed_from_run"] = resumed_from
    tags.update(dict(t.split("=", 1) for t in cfg.tracking.tags))
    tracker.set_tags(tags)
    tracker.log_params({**flatten(cfg.to_dict()), "run.world_size": dist.world_size, "run.num_nodes": len(nodes)})
    tracker.log_dict("config.yaml", cfg.to_dict())
    tracker.flush(wait=False)  # connect now, in the background, while the data and engines load
    return tracker


def _resumed_run_id(cfg, out_dir: Path) -> tuple[str | None, str | None]:
    """(run to continue, run this one forks from). A checkpoint of this run directory continues its
    MLflow run; a checkpoint from elsewhere starts a new run tagged with the one it came from."""
    from sempa_dist import checkpoint

    try:
        ckpt = checkpoint.find_resume(cfg.train.resume, out_dir)
        if ckpt is None:
            return None, None
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):  # train.resume errors are reported by the loop itself
        return None, None
    run_id = state.get("mlflow_run_id")
    if ckpt.resolve().is_relative_to(out_dir.resolve()):
        return run_id or _read_state(out_dir).get("run_id"), None
    return None, run_id


def replay(run_dir: str | Path, uri: str | None = None, journal: bool = False) -> tuple[str, int]:
    """Send a run directory's pending entries (all of its journal with `journal`) to `uri` (default:
    the run's own store). Returns (run id, values sent). Idempotent: values already there stay single."""
    run_dir = Path(run_dir)
    state = _read_state(run_dir)
    if not state:
        raise FileNotFoundError(f"{run_dir / STATE}: not a tracked run directory")
    target = uri or state["uri"]
    own = target == state["uri"]
    ops = _read_jsonl(run_dir / (JOURNAL if journal else PENDING))
    client = open_client(target)
    tags = {"mlflow.parentRunId": state["parent_run_id"]} if state.get("parent_run_id") and own else {}
    run_id = _ensure_run(client, target, state["experiment"], state.get("run_id"), state.get("run_name"), tags, False)
    _send(client, run_id, ops)
    if own:
        (run_dir / PENDING).unlink(missing_ok=True)
        state.update(run_id=run_id, unsent=0)
        _write_state(run_dir, state)
    return run_id, _count_values(ops)


def main(argv: list[str] | None = None) -> int:
    """python -m sempa_dist.tracking replay RUN_DIR | parent NAME | end RUN_ID"""
    ap = argparse.ArgumentParser(prog="python -m sempa_dist.tracking", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("replay", help="send a run directory's held-back values to its store (or --uri)")
    p.add_argument("run_dir")
    p.add_argument("--uri", help="store to send to (default: the run's own, from tracking.json)")
    p.add_argument("--journal", action="store_true", help="send the whole journal, not only the pending values")
    p = sub.add_parser("parent", help="create a parent run for a sweep and print its id "
                                      "(pass it to each trial as tracking.parent_run_id=ID)")
    p.add_argument("name")
    p.add_argument("--uri", default=None)
    p.add_argument("--experiment", default="sempa")
    p = sub.add_parser("end", help="mark a (parent) run finished")
    p.add_argument("run_id")
    p.add_argument("--uri", default=None)
    p.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    args = ap.parse_args(argv)
    uri = getattr(args, "uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///runs/mlflow.db"
    if args.cmd == "replay":
        run_id, n = replay(args.run_dir, args.uri, args.journal)
        print(f"sent {n} values to run {run_id} in {redact_text(args.uri or _read_state(Path(args.run_dir))['uri'])}")
    elif args.cmd == "parent":
        client = open_client(uri)
        print(_ensure_run(client, uri, args.experiment, None, args.name, {"run_kind": "sweep"}, False))
    else:
        open_client(uri).set_terminated(args.run_id, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
