"""NaN/inf loss or gradient norm: the step is never applied; `train.on_nonfinite` skips it and goes on,
or stops with the last checkpoint as the last good one.

The fault is real data corruption, not a patched function: the precomputed reference table (a cache
file on disk) gets a NaN for one example, so the step holding that example has a NaN loss and NaN
gradients on one rank only; DeepSpeed's gradient-norm check is global, so every rank drops the step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from sempa_dist.checkpoint import consolidated_state_dict
from sempa_dist.packing import epoch_order
from tests.distributed import metrics, sempa_train

pytestmark = pytest.mark.slow

BATCH = 16
BAD_STEP = 3  # the corrupted example is in this optimizer step
ARGS = ["configs/tiny_cpu.yaml", "ref.mode=precomputed", "train.export=false", "tracking.enabled=false",
        f"train.global_batch_size={BATCH}"]


@pytest.fixture(scope="module")
def corrupted_cache(tmp_path_factory) -> tuple[Path, int]:
    """A precomputed reference table in which one example of step BAD_STEP has a NaN log-prob.
    Returns (cache dir, number of examples)."""
    root = tmp_path_factory.mktemp("nonfinite")
    sempa_train(*ARGS, f"ref.cache_dir={root}/cache", f"train.output_dir={root}/warmup", "train.max_steps=1")
    (table_path,) = (root / "cache").glob("ref-*.pt")
    table = torch.load(table_path, weights_only=True)
    n = table["sums"].shape[0]
    order = epoch_order(n, 42, 0)  # tiny_cpu's seed: the same order the trainer uses
    table["sums"][order[(BAD_STEP - 1) * BATCH], 1] = float("nan")  # its rejected response
    torch.save(table, table_path)
    return root / "cache", n


def test_skip_leaves_the_weights_of_the_bad_step_untouched_and_goes_on(corrupted_cache, tmp_path):
    cache, _ = corrupted_cache
    out = tmp_path / "run"
    proc = sempa_train(*ARGS, f"ref.cache_dir={cache}", f"train.output_dir={out}", "train.max_steps=5",
                       "train.save_every=1", "train.keep_checkpoints=10")
    text = proc.stdout + proc.stderr
    assert f"step {BAD_STEP}: loss nan" in text and "update not applied" in text, text[-2000:]

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    bad = rows[BAD_STEP - 1]
    assert math.isnan(bad["loss"]) and not math.isfinite(bad["grad_norm"])
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows if r is not bad)

    # the update of the bad step was dropped on every rank; the steps around it were applied
    ckpt = out / "checkpoints"
    w = {s: consolidated_state_dict(ckpt / f"step-{s:06d}") for s in (BAD_STEP - 1, BAD_STEP, BAD_STEP + 1)}
    assert w[BAD_STEP].keys() == w[BAD_STEP - 1].keys()
    assert all(torch.equal(w[BAD_STEP][k], w[BAD_STEP - 1][k]) for k in w[BAD_STEP])
    assert any(not torch.equal(w[BAD_STEP + 1][k], w[BAD_STEP][k]) for k in w[BAD_STEP])
    assert all(torch.isfinite(v).all() for v in w[BAD_STEP + 1].values())
    assert json.loads((ckpt / "step-000005" / "trainer_state.json").read_text())["skipped_steps"] == 1
    assert json.loads((out / "summary.json").read_text())["final"]["skipped_steps"] == 1


def test_stop_keeps_the_last_good_checkpoint(corrupted_cache, tmp_path):
    cache, _ = corrupted_cache
    out = tmp_path / "run"
    store = f"sqlite:///{tmp_path}/mlflow.db"
    proc = sempa_train(*ARGS, f"ref.cache_dir={cache}", f"train.output_dir={out}", "train.max_steps=6",
                       "train.save_every=2", "train.on_nonfinite=stop", "tracking.enabled=true",
                       f"tracking.uri={store}", "tracking.flush_every_s=0", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    good = out / "checkpoints" / f"step-{BAD_STEP - 1:06d}"
    assert (f"sempa-train: step {BAD_STEP}: loss nan" in text and "train.on_nonfinite=stop" in text
            and f"last complete checkpoint: {good} (train.resume=auto" in text), text[-3000:]
    assert text.count("sempa-train: step") == 1  # one line, not one traceback per rank
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # the failing step is logged
    assert (out / "checkpoints" / "latest").read_text().strip() == good.name
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [good.name]
    assert not (out / "summary.json").exists()
    # MLflow: the run failed, and its loss history holds the NaN of the step that stopped it
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("sempa").experiment_id])
    assert run.info.status == "FAILED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == [1, 2, 3] and math.isnan(history[-1][1])


def test_skip_stops_after_too_many_in_a_row(corrupted_cache, tmp_path):
    """Every example corrupted: each step is non-finite; the run stops after max_consecutive_skips."""
    cache, n = corrupted_cache
    all_bad = tmp_path / "cache"
    all_bad.mkdir()
    (table_path,) = cache.glob("ref-*.pt")
    table = torch.load(table_path, weights_only=True)
    table["sums"][:, 0] = float("inf")  # chosen reference log-prob +inf: the loss is inf, gradients finite
    torch.save(table, all_bad / table_path.name)
    out = tmp_path / "run"
    proc = sempa_train(*ARGS, f"ref.cache_dir={all_bad}", f"train.output_dir={out}", "train.max_steps=6",
                       "train.max_consecutive_skips=2", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "2 non-finite steps in a row (train.max_consecutive_skips)" in text, text[-3000:]
    assert "no checkpoint was completed" in text
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [1, 2]
    # an inf loss with finite gradients is still dropped (the loop turns its gradients into NaN)
    assert all(math.isinf(r["loss"]) and not math.isfinite(r["grad_norm"]) for r in rows)
