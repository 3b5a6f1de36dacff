"""MLflow tracking against real stores: a sqlite store in a temp dir, a dead port, a real server."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sempa_dist import tracking
from sempa_dist.checkpoint import COMPLETE
from sempa_dist.cli import compare
from sempa_dist.config import load_config
from sempa_dist.distributed import DistInfo, free_port
from sempa_dist.preemption import Preempted
from tests.distributed import REPO, child_env, metrics
from tests.mlflow_server import MlflowServer

RANK0 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
HF_SECRET = "hf_" + "Zx9" * 10
URL_PASSWORD = "hunter2-but-longer"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one runs MLflow's schema migrations: ~5 s)."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("store") / "mlflow.db")


def client(uri: str):
    return tracking.open_client(uri)


def cfg_for(run_dir: Path, uri: str, *overrides: str):
    return load_config(REPO / "configs/tiny_cpu.yaml", [f"train.output_dir={run_dir}", f"tracking.uri={uri}", *overrides])


def steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))


def test_redaction_patterns():
    env = ["s3cr3t-from-the-env"]
    assert tracking.redact_text("x s3cr3t-from-the-env y", env) == f"x {tracking.REDACTED} y"
    assert HF_SECRET not in tracking.redact_text(f"token is {HF_SECRET}", [])
    assert URL_PASSWORD not in tracking.redact_text(f"https://bob:{URL_PASSWORD}@host/x", [])
    assert tracking.redact_text("api_key=abc123 team=nlp", []) == f"api_key={tracking.REDACTED} team=nlp"
    # names with "tokens"/"tokenizer" are counts and models, not secrets
    assert tracking.redact({"max_tokens": 1024, "tokenizer": "x", "hf_token": "abc"}, env_secrets=[]) == {
        "max_tokens": 1024, "tokenizer": "x", "hf_token": tracking.REDACTED}


def test_params_tags_and_config_artifact_without_secrets(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("SERVICE_PASSWORD", "pw-from-env-123")
    run_dir = tmp_path / "run"
    cfg = cfg_for(run_dir, store, "loss.beta=0.25", f"data.hub_file={HF_SECRET}",
                  f"data.path=https://bob:{URL_PASSWORD}@example.com/pw-from-env-123.csv",
                  "tracking.tags=[api_key=abc123,team=nlp]")
    with tracking.start(cfg, RANK0, kind="train") as tracker:
        assert isinstance(tracker, tracking.Tracker)
    run = client(store).get_run(tracker.run_id)
    params, tags = run.data.params, run.data.tags
    # the config, flattened
    assert params["loss.beta"] == "0.25" and params["model.lora.r"] == "8" and params["packing.max_tokens"] == "1024"
    assert params["train.output_dir"] == str(run_dir) and params["run.world_size"] == "1"
    assert tags["loss_type"] == "dpo" and tags["ref_mode"] == "engine" and tags["model"] == "tiny-llama"
    assert tags["run_kind"] == "train" and tags["team"] == "nlp" and tags["git.commit"]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert tags["api_key"] == tracking.REDACTED and params["data.hub_file"] == tracking.REDACTED
    # the config artifact, next to the store (not in the cwd)
    local = client(store).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text())["loss"]["beta"] == 0.25
    assert run.info.artifact_uri.startswith((Path(store[len("sqlite:///"):]).parent / "mlartifacts" / "sempa").as_uri())
    # no secret anywhere: store, artifact, nor the run directory's own files
    logged = json.dumps([params, tags]) + Path(local).read_text()
    logged += "".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())
    for secret in (HF_SECRET, URL_PASSWORD, "pw-from-env-123", "abc123"):
        assert secret not in logged, secret


def test_metrics_are_sent_in_batches(store, tmp_path):
    tracker = tracking.Tracker(store, "unit", tmp_path / "run", run_name="batched", flush_every_s=3600)
    assert tracker.flush()  # connected, run created
    calls = []
    send = tracker._client.log_batch
    tracker._client.log_batch = lambda *a, **k: (calls.append(len(k.get("metrics", ()))), send(*a, **k))[1]
    names = ["loss", "rewards/accuracy", "rewards/margin", "lr", "grad_norm", "tokens_per_s", "step_time_s",
             "logps/chosen", "logps/rejected", "peak_rss_mb"]
    t0 = time.perf_counter()
    for step in range(1, 301):
        tracker.log_metrics({name: step * 0.01 for name in names} | {"step": step, "note": "text"}, step)
    per_step_ms = (time.perf_counter() - t0) / 300 * 1000
    tracker.finish()
    assert sum(calls) >= 3000  # every value went through log_batch...
    assert len(calls) <= 6, calls  # ...in a handful of calls (<= 1000 metrics each), not 3000
    assert max(calls) <= tracking.MAX_METRICS
    assert steps(store, tracker.run_id) == list(range(1, 301))
    assert per_step_ms < 5, per_step_ms  # queueing only: the loop never waits for the store


def test_dead_server_spills_then_replays_without_loss(store, tmp_path, capfd):
    run_dir = tmp_path / "run"
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = tracking.Tracker(dead, "unit", run_dir, run_name="offline", flush_every_s=0.05)
    tracker.log_params({"loss.beta": 0.3})
    t0 = time.perf_counter()
    for step in range(1, 41):
        tracker.log_metrics({"loss": 1.0 / step, "rewards/accuracy": 0.5}, step)
        time.sleep(0.01)
    assert time.perf_counter() - t0 < 2.0  # a dead store costs the loop nothing
    tracker.finish()
    err = capfd.readouterr().err
    assert "WARNING: cannot reach the tracking store" in err and "NOTE" in err
    assert f"python -m sempa_dist.tracking replay {run_dir}" in err
    assert (run_dir / tracking.PENDING).is_file()
    # the whole run is in the local fallback store already
    state = json.loads((run_dir / tracking.STATE).read_text())
    fb = state["fallback"]
    assert steps(fb["uri"], fb["run_id"]) == list(range(1, 41))
    # and the pending values go to a live store later, all of them
    run_id, sent = tracking.replay(run_dir, uri=store)
    assert sent >= 80
    run = client(store).get_run(run_id)
    assert steps(store, run_id) == list(range(1, 41)) and steps(store, run_id, "rewards/accuracy") == list(range(1, 41))
    assert run.data.params["loss.beta"] == "0.3" and run.info.status == "FINISHED" and run.info.run_name == "offline"


def test_nested_runs(store, tmp_path):
    parent = tracking.Tracker(store, "unit", tmp_path / "sweep", run_name="sweep")
    trial = parent.child("trial-1")
    trial.log_metrics({"loss": 0.5}, 1)
    trial.finish()
    cfg = cfg_for(tmp_path / "trial-2", store, f"tracking.parent_run_id={parent.run_id}")
    with tracking.start(cfg, RANK0):
        pass
    parent.finish()
    trial2 = json.loads((tmp_path / "trial-2" / tracking.STATE).read_text())["run_id"]
    for run_id in (trial.run_id, trial2):
        assert client(store).get_run(run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def fake_checkpoint(run_dir: Path, step: int, run_id: str | None) -> None:
    tag_dir = run_dir / "checkpoints" / f"step-{step:06d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "trainer_state.json").write_text(json.dumps({"step": step, "mlflow_run_id": run_id}))
    (tag_dir / COMPLETE).write_text("ok\n")
    (run_dir / "checkpoints" / "latest").write_text(tag_dir.name + "\n")


def test_resume_continues_the_same_run(store, tmp_path):
    run_dir = tmp_path / "resumable"
    cfg = cfg_for(run_dir, store, "train.resume=auto", "tracking.experiment=resume")
    with pytest.raises(Preempted), tracking.start(cfg, RANK0) as first:
        for step in (1, 2, 3):
            first.log_metrics({"loss": 1.0 / step}, step)
        first.flush()
        fake_checkpoint(run_dir, 3, first.run_id)
        raise Preempted(3)
    c = client(store)
    assert c.get_run(first.run_id).info.status == "RUNNING"  # left for the requeued job
    # the requeued job: same directory, resumes from the checkpoint; a changed param is kept as a tag
    cfg = cfg_for(run_dir, store, "train.resume=auto", "tracking.experiment=resume", "train.max_steps=6")
    with tracking.start(cfg, RANK0) as second:
        for step in (4, 5, 6):
            second.log_metrics({"loss": 1.0 / step}, step)
    assert second.run_id == first.run_id
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED" and steps(store, run.info.run_id) == [1, 2, 3, 4, 5, 6]
    assert run.data.params["train.max_steps"] == "30" and run.data.tags["resume.train.max_steps"] == "6"
    exp = c.get_experiment_by_name("resume")
    assert len(c.search_runs([exp.experiment_id])) == 1  # one MLflow run per training job


def test_failure_marks_the_run_failed(store, tmp_path):
    cfg = cfg_for(tmp_path / "broken", store)
    with pytest.raises(RuntimeError), tracking.start(cfg, RANK0) as tracker:
        raise RuntimeError("boom")
    assert client(store).get_run(tracker.run_id).info.status == "FAILED"


def test_disabled_and_non_main_ranks_get_a_null_tracker(store, tmp_path):
    cfg = cfg_for(tmp_path / "off", store, "tracking.enabled=false")
    assert type(tracking.start(cfg, RANK0)) is tracking.NullTracker
    cfg = cfg_for(tmp_path / "rank1", store)
    rank1 = DistInfo(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    assert type(tracking.start(cfg, rank1)) is tracking.NullTracker
    assert not (tmp_path / "off").exists() and not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_server_killed_mid_run_loses_nothing(tmp_path, capsys):
    """2-process training logs to a real server; the server is killed (SIGKILL) mid-run. Training
    finishes (exit 0) with a note; the fallback store has every step; after a restart on the same
    database, `python -m sempa_dist.tracking replay RUN_DIR` lands every step on the server."""
    server = MlflowServer(tmp_path / "server")
    started_in = server.start()
    run_dir = tmp_path / "run"
    total = 30
    cmd = [sys.executable, "-m", "sempa_dist.cli.train", "configs/tiny_cpu.yaml", f"train.output_dir={run_dir}",
           f"train.max_steps={total}", "train.save_every=0", "train.export=false", "train.log_every=1",
           f"tracking.uri={server.uri}", "tracking.flush_every_s=0.2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        # wait until the server holds a few live steps, then crash it
        deadline, live = time.monotonic() + 240, []
        while time.monotonic() < deadline and proc.poll() is None:
            state_file = run_dir / tracking.STATE
            run_id = json.loads(state_file.read_text()).get("run_id") if state_file.is_file() else None
            live = steps(server.uri, run_id) if run_id else []
            if len(live) >= 3:
                break
            time.sleep(0.3)
        done_before_kill = len(metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else 0
        server.kill()
        assert len(live) >= 3 and done_before_kill < total, (live, done_before_kill)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()
    assert proc.returncode == 0, out[-3000:]
    assert "NOTE: the tracking store" in out and "python -m sempa_dist.tracking replay" in out, out[-3000:]
    assert (run_dir / "summary.json").is_file()
    state = json.loads((run_dir / tracking.STATE).read_text())
    assert steps(state["fallback"]["uri"], state["fallback"]["run_id"]) == list(range(1, total + 1))

    restarted = MlflowServer(tmp_path / "server", port=server.port)  # same database, same address
    restarted.start()
    try:
        subprocess.run([sys.executable, "-m", "sempa_dist.tracking", "replay", str(run_dir)], cwd=REPO, env=child_env(),
                       check=True, timeout=120)
        assert steps(restarted.uri, state["run_id"]) == list(range(1, total + 1))
        run = client(restarted.uri).get_run(state["run_id"])
        assert run.info.status == "FINISHED"
        assert [f.path for f in client(restarted.uri).list_artifacts(state["run_id"])].count("summary.json") == 1
        # sempa-compare reads the server too
        capsys.readouterr()
        assert compare.main(["--uri", restarted.uri, "--format", "json"]) == 0
        (rec,) = json.loads(capsys.readouterr().out)
        assert rec["run_id"] == state["run_id"]
        assert math.isclose(rec["metrics"]["loss"]["final"], metrics(run_dir)[-1]["loss"], rel_tol=1e-6)
    finally:
        restarted.stop()
    print(f"server healthy in {started_in:.1f} s; {len(live)} steps live before the kill")


@pytest.mark.slow
def test_server_down_at_start_gets_everything_once_up(tmp_path, capfd):
    server = MlflowServer(tmp_path / "server")  # not started yet: its port refuses connections
    run_dir = tmp_path / "run"
    tracker = tracking.Tracker(server.uri, "late", run_dir, run_name="late", flush_every_s=0.1, retry_s=0.25)
    tracker.log_params({"loss.beta": 0.1})
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    assert not tracker.flush() and tracker.run_id is None and (run_dir / tracking.PENDING).is_file()
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
        assert not (run_dir / tracking.PENDING).exists()
        err = capfd.readouterr().err
        assert "cannot reach the tracking store" in err and "reachable again" in err and "NOTE" not in err
    finally:
        server.stop()
