"""The tracker against real stores: a sqlite store in a temp dir, a dead port, a real server.

What the loop pays per step is measured by bench/tracking_overhead.py, not asserted here: a clock
on a busy machine proves little. The tests assert the mechanism instead (the store is only ever
called from the sender thread, and the loop goes on while the store is stuck).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from sempa_dist.distributed import free_port
from sempa_dist.redaction import REDACTED, redact, redact_text
from sempa_dist.tracking import PENDING, STATE, Tracker, replay
from sempa_dist.tracking.store import MAX_METRICS
from tests.mlflow_server import MlflowServer
from tests.tracking.helpers import client, steps

HF_SECRET = "hf_" + "Zx9" * 10
URL_PASSWORD = "hunter2-but-longer"
# what the loop logs each step
NAMES = ["loss", "rewards/accuracy", "rewards/margin", "lr", "grad_norm", "tokens_per_s", "step_time_s",
         "logps/chosen", "logps/rejected", "peak_rss_mb"]


def test_redaction_patterns():
    env = ["s3cr3t-from-the-env"]
    assert redact_text("x s3cr3t-from-the-env y", env) == f"x {REDACTED} y"
    assert HF_SECRET not in redact_text(f"token is {HF_SECRET}", [])
    assert URL_PASSWORD not in redact_text(f"https://bob:{URL_PASSWORD}@host/x", [])
    assert redact_text("api_key=abc123 team=nlp", []) == f"api_key={REDACTED} team=nlp"
    # names with "tokens"/"tokenizer" are counts and models, not secrets
    assert redact({"max_tokens": 1024, "tokenizer": "x", "hf_token": "abc"}, env_secrets=[]) == {
        "max_tokens": 1024, "tokenizer": "x", "hf_token": REDACTED}


def test_metrics_are_sent_in_batches(store, tmp_path):
    tracker = Tracker(store, "unit", tmp_path / "run", run_name="batched", flush_every_s=3600)
    assert tracker.flush()  # connected, run created
    calls = []
    send = tracker._client.log_batch
    tracker._client.log_batch = lambda *a, **k: (calls.append(len(k.get("metrics", ()))), send(*a, **k))[1]
    for step in range(1, 301):
        tracker.log_metrics({name: step * 0.01 for name in NAMES} | {"step": step, "note": "text"}, step)
    tracker.finish()
    assert sum(calls) >= 3000  # every value went through log_batch...
    assert len(calls) <= 6, calls  # ...in a handful of calls (<= 1000 metrics each), not 3000
    assert max(calls) <= MAX_METRICS
    assert steps(store, tracker.run_id) == list(range(1, 301))


def test_the_loop_never_waits_for_the_store(store, tmp_path):
    """With the store stuck inside log_batch, the loop still logs 300 steps (log_metrics only
    queues), the store is only ever called from the sender thread, and every value lands once the
    store answers again."""
    tracker = Tracker(store, "unit", tmp_path / "run", run_name="stuck", flush_every_s=3600)
    assert tracker.flush()  # connected: from here on every send is a log_batch
    send = tracker._client.log_batch
    entered, released, answered = threading.Event(), threading.Event(), threading.Event()
    callers: set[str] = set()

    def stuck(*args: Any, **kwargs: Any) -> Any:
        callers.add(threading.current_thread().name)
        entered.set()
        released.wait(120)  # only a bound: a tracker that made the loop wait fails below instead of hanging
        answered.set()
        return send(*args, **kwargs)

    tracker._client.log_batch = stuck
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.flush(wait=False)
    assert entered.wait(60), "the sender thread never called the store"
    for step in range(2, 301):  # 3000 values: the buffer fills and wakes the (stuck) sender twice over
        tracker.log_metrics({name: 1.0 / step for name in NAMES}, step)
    # the loop is through while the store has not answered once: it waited for nothing
    assert not answered.is_set()
    released.set()
    tracker.finish()
    assert callers == {"mlflow-sender"}, callers
    assert steps(store, tracker.run_id) == list(range(1, 301))


def test_dead_server_spills_then_replays_without_loss(store, tmp_path, capfd):
    run_dir = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(dead, "unit", run_dir, run_name="offline", flush_every_s=0.05)
    tracker.log_params({"loss.beta": 0.3})
    for step in range(1, 41):
        tracker.log_metrics({"loss": 1.0 / step, "rewards/accuracy": 0.5}, step)
        time.sleep(0.01)  # the sender's turn: it tries the dead store meanwhile
    tracker.finish()
    err = capfd.readouterr().err
    assert "WARNING: cannot reach the tracking store" in err and "NOTE" in err
    assert f"sempa-tracking replay {run_dir}" in err
    assert (run_dir / PENDING).is_file()
    # the whole run is in the local fallback store already
    state = json.loads((run_dir / STATE).read_text())
    fb = state["fallback"]
    assert steps(fb["uri"], fb["run_id"]) == list(range(1, 41))
    # and the pending values go to a live store later, all of them
    run_id, sent = replay(run_dir, uri=store)
    assert sent >= 80
    run = client(store).get_run(run_id)
    assert steps(store, run_id) == list(range(1, 41)) and steps(store, run_id, "rewards/accuracy") == list(range(1, 41))
    assert run.data.params["loss.beta"] == "0.3" and run.info.status == "FINISHED" and run.info.run_name == "offline"


def test_child_runs_nest_under_their_parent(store, tmp_path):
    parent = Tracker(store, "unit", tmp_path / "sweep", run_name="sweep")
    trial = parent.child("trial-1")
    trial.log_metrics({"loss": 0.5}, 1)
    trial.finish()
    parent.finish()
    assert trial.run_dir == tmp_path / "sweep" / "children" / "trial-1"
    assert client(store).get_run(trial.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


@pytest.mark.slow
def test_server_down_at_start_gets_everything_once_up(tmp_path, capfd):
    server = MlflowServer(tmp_path / "server")  # not started yet: its port refuses connections
    run_dir = tmp_path / "run"
    tracker = Tracker(server.uri, "late", run_dir, run_name="late", flush_every_s=0.1, retry_s=0.25)
    tracker.log_params({"loss.beta": 0.1})
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    assert not tracker.flush() and tracker.run_id is None and (run_dir / PENDING).is_file()
    server.start()
    try:
        deadline = time.monotonic() + 90
        while not tracker.flush() and time.monotonic() < deadline:  # training goes on meanwhile
            step += 1
            tracker.log_metrics({"loss": 1.0 / step}, step)
            time.sleep(0.2)
        tracker.finish()
        assert steps(server.uri, tracker.run_id) == list(range(1, step + 1))
        assert client(server.uri).get_run(tracker.run_id).data.params["loss.beta"] == "0.1"
        assert not (run_dir / PENDING).exists()
        err = capfd.readouterr().err
        assert "cannot reach the tracking store" in err and "reachable again" in err and "NOTE" not in err
    finally:
        server.stop()
