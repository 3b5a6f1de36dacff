"""tracking.start: the run's tracker from a config, its tags and params, resume, and who gets a null one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sempa_dist import checkpoint, tracking
from sempa_dist.checkpoint import COMPLETE
from sempa_dist.distributed import DistInfo
from sempa_dist.preemption import Preempted
from sempa_dist.redaction import REDACTED
from tests.tracking.helpers import RANK0, cfg_for, client, steps

HF_SECRET = "hf_" + "Zx9" * 10
URL_PASSWORD = "hunter2-but-longer"


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
    assert tags["api_key"] == REDACTED and params["data.hub_file"] == REDACTED
    # the config artifact, next to the store (not in the cwd)
    local = client(store).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text())["loss"]["beta"] == 0.25
    assert run.info.artifact_uri.startswith((Path(store[len("sqlite:///"):]).parent / "mlartifacts" / "sempa").as_uri())
    # no secret anywhere: store, artifact, nor the run directory's own files
    logged = json.dumps([params, tags]) + Path(local).read_text()
    logged += "".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())
    for secret in (HF_SECRET, URL_PASSWORD, "pw-from-env-123", "abc123"):
        assert secret not in logged, secret


def test_a_trial_nests_under_its_sweep(store, tmp_path):
    parent = tracking.Tracker(store, "unit", tmp_path / "sweep", run_name="sweep")
    assert parent.flush()  # the parent run exists before the trial names it
    cfg = cfg_for(tmp_path / "trial", store, f"tracking.parent_run_id={parent.run_id}")
    with tracking.start(cfg, RANK0):
        pass
    parent.finish()
    trial = json.loads((tmp_path / "trial" / tracking.STATE).read_text())["run_id"]
    assert client(store).get_run(trial).data.tags["mlflow.parentRunId"] == parent.run_id


def fake_checkpoint(run_dir: Path, step: int, run_id: str | None) -> Path:
    """A complete checkpoint as far as tracking looks: trainer_state.json with the MLflow run id."""
    tag_dir = run_dir / "checkpoints" / f"step-{step:06d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "trainer_state.json").write_text(json.dumps({"step": step, "mlflow_run_id": run_id}))
    (tag_dir / COMPLETE).write_text("ok\n")
    (run_dir / "checkpoints" / "latest").write_text(tag_dir.name + "\n")
    return tag_dir


def test_resume_continues_the_same_run(store, tmp_path):
    run_dir = tmp_path / "resumable"
    cfg = cfg_for(run_dir, store, "train.resume=auto", "tracking.experiment=resume")
    # the caller finds the checkpoint once (train.py does, before the engines) and passes it in
    resume_from = checkpoint.find_resume(cfg.train.resume, run_dir)
    assert resume_from is None
    with pytest.raises(Preempted), tracking.start(cfg, RANK0, resume_from=resume_from) as first:
        for step in (1, 2, 3):
            first.log_metrics({"loss": 1.0 / step}, step)
        first.flush()
        fake_checkpoint(run_dir, 3, first.run_id)
        raise Preempted(3)
    c = client(store)
    assert c.get_run(first.run_id).info.status == "RUNNING"  # left for the requeued job
    # the requeued job: same directory, resumes from the checkpoint; a changed param is kept as a tag
    cfg = cfg_for(run_dir, store, "train.resume=auto", "tracking.experiment=resume", "train.max_steps=6")
    resume_from = checkpoint.find_resume(cfg.train.resume, run_dir)
    assert resume_from is not None
    with tracking.start(cfg, RANK0, resume_from=resume_from) as second:
        for step in (4, 5, 6):
            second.log_metrics({"loss": 1.0 / step}, step)
    assert second.run_id == first.run_id
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED" and steps(store, run.info.run_id) == [1, 2, 3, 4, 5, 6]
    assert run.data.params["train.max_steps"] == "30" and run.data.tags["resume.train.max_steps"] == "6"
    exp = c.get_experiment_by_name("resume")
    assert len(c.search_runs([exp.experiment_id])) == 1  # one MLflow run per training job


def test_resume_from_another_directory_starts_a_new_run(store, tmp_path):
    with tracking.start(cfg_for(tmp_path / "a", store), RANK0) as a:
        pass
    ckpt = fake_checkpoint(tmp_path / "a", 3, a.run_id)
    cfg = cfg_for(tmp_path / "b", store, f"train.resume={ckpt}")
    with tracking.start(cfg, RANK0, resume_from=ckpt) as b:
        pass
    assert b.run_id != a.run_id
    assert client(store).get_run(b.run_id).data.tags["resumed_from_run"] == a.run_id


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
