"""The store: one default URI, sending within MLflow's per-call limits, replaying a run directory."""

from __future__ import annotations

from pathlib import Path

from sempa_dist.config import TrainConfig
from sempa_dist.tracking import rundir
from sempa_dist.tracking.store import MAX_METRICS, MAX_PARAMS_TAGS, ensure_run, replay, resolve_uri, send
from tests.tracking.helpers import client, steps


def test_one_default_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set but empty (as tests/cli/test_compare.py does): unset
    runs = tmp_path.resolve() / "runs"
    # beside the run directory; without one, beside the default run directory: the same rule
    assert resolve_uri(None, "runs/beta0.1") == f"sqlite:///{runs}/mlflow.db"
    assert resolve_uri() == resolve_uri(None, TrainConfig.output_dir) == f"sqlite:///{runs}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert resolve_uri() == resolve_uri(None, "runs/x") == "http://head:5000"
    assert resolve_uri("http://other:5000", "runs/x") == "http://other:5000"


def test_send_stays_within_mlflow_limits(store):
    c = client(store)
    run_id = ensure_run(c, store, "unit", None, "limits", {}, reopen=False)
    calls = []
    log_batch = c.log_batch

    def counting(run_id: str, metrics=(), params=(), tags=()):
        calls.append((len(metrics), len(params), len(tags)))
        return log_batch(run_id, metrics=metrics, params=params, tags=tags)

    c.log_batch = counting
    ops = [{"op": "params", "data": {f"p{i}": str(i) for i in range(250)}},
           {"op": "tags", "data": {f"t{i}": str(i) for i in range(150)}},
           {"op": "metrics", "data": [["loss", 1.0 / s, 0, s] for s in range(1, 2101)]},
           {"op": "status", "status": "FINISHED", "time": None}]
    send(c, run_id, ops)
    assert all(m <= MAX_METRICS and p <= MAX_PARAMS_TAGS and t <= MAX_PARAMS_TAGS for m, p, t in calls), calls
    assert len(calls) == 3 + 2 + 3  # params 100+100+50, tags 100+50, metrics 1000+1000+100
    run = c.get_run(run_id)
    assert len(run.data.params) == 250 and run.data.tags["t149"] == "149" and run.info.status == "FINISHED"
    assert steps(store, run_id) == list(range(1, 2101))


def test_replay_sends_pending_values_once(store, tmp_path):
    run_dir: Path = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_state(run_dir, {"uri": store, "experiment": "unit", "run_name": "replayed", "run_id": None,
                                 "parent_run_id": None})
    ops = [{"op": "params", "data": {"loss.beta": "0.3"}},
           {"op": "metrics", "data": [["loss", 1.0 / s, 1000 * s, s] for s in range(1, 6)]}]
    rundir.append_jsonl(run_dir / rundir.PENDING, ops)
    run_id, sent = replay(run_dir)
    assert sent == 6 and not (run_dir / rundir.PENDING).exists()
    assert rundir.read_state(run_dir)["run_id"] == run_id  # the run directory now names its run
    # the same entries again (a replay repeated after a crash): nothing doubles
    rundir.append_jsonl(run_dir / rundir.PENDING, ops)
    assert replay(run_dir)[0] == run_id
    assert steps(store, run_id) == [1, 2, 3, 4, 5]
    assert client(store).get_run(run_id).data.params == {"loss.beta": "0.3"}
