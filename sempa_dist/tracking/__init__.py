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
(``sqlite:///<output_dir>/mlflow_fallback.db``); ``sempa-tracking replay RUN_DIR`` sends the pending
entries once the server is back.

Resume: the run id is kept in ``<output_dir>/tracking.json`` and in every checkpoint's trainer
state; a job resuming from one of this directory's checkpoints continues that MLflow run.

Secrets: anything under a name like TOKEN, KEY, SECRET, PASSWORD or CREDENTIAL, and text that
looks like a token (or equals a secret environment variable's value), is masked before it is
logged as a param, tag or artifact.

The parts: `store` (the MLflow side: URI, client, run, sending, replay), `rundir` (what a run
directory keeps: tracking.json, journal, pending entries), `tracker` (`Tracker`, `NullTracker` and
the sender thread), `runinfo` (git, accelerator, nodes); `start` here puts them together for a
config. The command line is `sempa_dist.cli.tracking` (``sempa-tracking``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sempa_dist.tracking.rundir import JOURNAL, PENDING, STATE, read_state
from sempa_dist.tracking.runinfo import environment_tags, node_list
from sempa_dist.tracking.store import open_client, replay, resolve_uri
from sempa_dist.tracking.tracker import NullTracker, Tracker

__all__ = ["JOURNAL", "PENDING", "STATE", "NullTracker", "Tracker", "open_client", "replay", "resolve_uri", "start"]

TRAINER_STATE = "trainer_state.json"  # in each checkpoint (sempa_dist.checkpoint writes it); holds mlflow_run_id


def start(cfg: Any, dist: Any, kind: str = "train", resume_from: str | Path | None = None) -> NullTracker:
    """The run's tracker. Collective (the node list is gathered): every rank calls it. Rank 0 gets a
    `Tracker` with the config (flattened params + config.yaml), git state, hosts and run tags queued;
    the other ranks, and every rank when tracking is disabled, a `NullTracker`.

    `resume_from` is the checkpoint the loop resumes from (``checkpoint.find_resume``, found once by
    the caller), None for a fresh start: a checkpoint of this run directory continues its MLflow run;
    one from elsewhere starts a new run tagged ``resumed_from_run`` with the run it came from."""
    if not cfg.tracking.enabled:
        return NullTracker()
    nodes = node_list(dist)
    if not dist.is_main:
        return NullTracker()
    from sempa_dist.config import flatten

    out_dir = Path(cfg.train.output_dir)
    run_id, resumed_from = _runs_of_checkpoint(resume_from, out_dir)
    tracker = Tracker(resolve_uri(cfg.tracking.uri, out_dir), cfg.tracking.experiment, out_dir,
                      run_name=cfg.tracking.run_name or out_dir.resolve().name, run_id=run_id,
                      parent_run_id=cfg.tracking.parent_run_id, flush_every_s=cfg.tracking.flush_every_s,
                      reopen=run_id is not None)
    tags = {"model": cfg.model.name, "ref_mode": cfg.ref.mode, "loss_type": cfg.loss.type, "run_kind": kind,
            **environment_tags(nodes)}
    if resumed_from:
        tags["resumed_from_run"] = resumed_from
    tags.update(dict(t.split("=", 1) for t in cfg.tracking.tags))
    tracker.set_tags(tags)
    tracker.log_params({**flatten(cfg.to_dict()), "run.world_size": dist.world_size, "run.num_nodes": len(nodes)})
    tracker.log_dict("config.yaml", cfg.to_dict())
    tracker.flush(wait=False)  # connect now, in the background, while the data and engines load
    return tracker


def _runs_of_checkpoint(resume_from: str | Path | None, out_dir: Path) -> tuple[str | None, str | None]:
    """(run to continue, run this one forks from) when resuming from `resume_from`. A checkpoint of
    this run directory continues its MLflow run; a checkpoint from elsewhere starts a new run tagged
    with the one it came from."""
    if resume_from is None:
        return None, None
    ckpt = Path(resume_from)
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError):  # a broken checkpoint is the loop's to report (checkpoint.load), not ours
        return None, None
    run_id = state.get("mlflow_run_id")
    if ckpt.resolve().is_relative_to(out_dir.resolve()):
        return run_id or read_state(out_dir).get("run_id"), None
    return None, run_id
