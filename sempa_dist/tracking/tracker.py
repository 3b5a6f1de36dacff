"""The trackers the training loop talks to: `Tracker`, one MLflow run fed from rank 0, whose sender
thread does all store traffic, and `NullTracker`, the same interface doing nothing.

The loop only queues: `log_metrics` and friends append to a buffer and return. The sender thread wakes
every ``flush_every_s`` seconds (at once when 1000 metrics wait, or with ``flush_every_s: 0``), appends
what it took to the journal and sends it with ``MlflowClient.log_batch``; what the store did not take
waits in the pending file and is retried with back-off, so neither a slow nor a dead server can stall
a step. If the store is still down when the run ends, a note says so and the whole journal is written
to a local fallback store in the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import numbers
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sempa_dist.preemption import Preempted
from sempa_dist.redaction import redact, redact_text, secret_env_values
from sempa_dist.tracking.rundir import (
    ARTIFACTS,
    FALLBACK_DB,
    JOURNAL,
    PENDING,
    append_jsonl,
    count_values,
    read_jsonl,
    read_state,
    write_state,
)
from sempa_dist.tracking.store import (
    MAX_METRICS,
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    ensure_run,
    open_client,
    say,
    send,
)

F = TypeVar("F", bound=Callable[..., Any])


def _safe(fn: F) -> F:
    """Tracking problems are reported, never raised into the training loop (nor over its exception)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            say(f"WARNING: {fn.__name__} failed ({type(e).__name__}: {redact_text(str(e))[:300]}); training goes on")
            return None

    return wrapper  # type: ignore[return-value]


def _text(v: Any, limit: int = MAX_PARAM_LEN) -> str:
    """A param/tag value: text as is, anything else as JSON (null, true, [..]), cut at MLflow's limit."""
    return (v if isinstance(v, str) else json.dumps(v, default=str))[:limit]


def _key(k: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . / and spaces)."""
    return re.sub(r"[^/\w.\- ]", "_", str(k))[:250]


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
        unsent = count_values(read_jsonl(self._pending))
        state = self._save_state(status=status or "RUNNING", unsent=unsent)
        where = f"{redact_text(self.uri)} (experiment {self.experiment!r})"
        if not hung and not unsent:
            say(f"run {self.run_id} [{status or 'RUNNING'}] in {where}")
            return
        since = f" since step {self._down_since_step}" if self._down_since_step is not None else ""
        say(f"NOTE: the tracking store {where} was unreachable{since} ({self._last_error}).")
        if status is None:  # preempted: the requeued job sends them
            say(f"  {unsent} values wait in {self._pending}; the resumed job sends them.")
            return
        if hung:
            say(f"  the last send did not return within {self.finish_timeout_s:.0f} s; replay with --journal.")
        fb = self._write_fallback(state)
        say(f"  nothing is lost: {unsent} unsent values are kept in {self._pending}" +
            (f"; the whole run is also in the local store {fb}" if fb else "") + ".")
        say(f"  send them once the server is back: sempa-tracking replay {self.run_dir}")

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
                say(f"internal error while sending: {self._last_error}")
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
            append_jsonl(self._journal, ops)  # the full record: a fallback store is built from it
        if not final and time.monotonic() < self._retry_at:  # the store is away: don't knock every step
            if ops:
                append_jsonl(self._pending, ops)
            return
        try:
            if not self._connected:
                self._connect()
            pending = read_jsonl(self._pending)
            send(self._client, self.run_id, pending + ops)
        except Exception as e:
            if ops:
                append_jsonl(self._pending, ops)
            self._failed(e)
            return
        self._pending.unlink(missing_ok=True)
        self._failures, self._retry_at = 0, 0.0
        if self._down_since_step is not None:
            say(f"the tracking store is reachable again: {count_values(pending)} held-back values sent")
            self._down_since_step = None

    def _connect(self) -> None:
        if self._client is None:
            self._client = open_client(self.uri)
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        self.run_id = ensure_run(self._client, self.uri, self.experiment, self.run_id, self.run_name, tags, self._reopen)
        self._connected = True
        self._save_state()

    def _failed(self, e: Exception) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + min(300.0, self.retry_s * 2 ** (self._failures - 1))  # back off
        self._last_error = _short_error(e)
        if self._down_since_step is None:
            self._down_since_step = self._last_step
            say(f"WARNING: cannot reach the tracking store {redact_text(self.uri)} ({self._last_error}). "
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
        state = read_state(self.run_dir)
        state.update({"uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                      "run_id": self.run_id, "parent_run_id": self.parent_run_id, **extra})
        with contextlib.suppress(OSError):
            write_state(self.run_dir, state)
        return state

    def _write_fallback(self, state: dict[str, Any]) -> str | None:
        """The whole journal into a sqlite store in the run directory; returns 'URI (run ID)'."""
        uri = "sqlite:///" + str((self.run_dir / FALLBACK_DB).resolve())
        try:
            client = open_client(uri)
            fb = state.get("fallback") or {}
            tags = {"sempa.fallback_for": f"{redact_text(self.uri)} run {self.run_id}"}
            run_id = ensure_run(client, uri, self.experiment, fb.get("run_id"), self.run_name, tags, reopen=False)
            send(client, run_id, read_jsonl(self._journal))
        except Exception as e:
            say(f"  the fallback store {uri} failed too ({type(e).__name__}: {e}); the journal {self._journal} "
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
    """A load or tokenize report (a dataclass or a mapping) as a plain dict."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    return dict(report or {})


def _cpu_sampler() -> Callable[[], float | None]:
    """cpu_percent since the previous call (its first call only starts the interval)."""
    try:
        import psutil

        psutil.cpu_percent(None)
        return lambda: psutil.cpu_percent(None)
    except Exception:
        return lambda: None
