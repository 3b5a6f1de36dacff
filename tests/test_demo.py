"""`make demo`'s script end to end, shrunk: a tiny model and 2 steps instead of SmolLM2 and 120."""

import json
import subprocess
import sys

import pytest

from tests.distributed import child_env

pytestmark = pytest.mark.slow


def test_demo_trains_evaluates_and_logs(tmp_path):
    from sempa_dist.eval.sts import data_available

    env_ok = data_available()
    proc = subprocess.run([sys.executable, "-m", "sempa_dist.demo", "model.name=tiny-llama", "train.max_steps=2",
                           "train.save_every=0", "data.max_examples=64"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = tmp_path / "runs" / "demo"
    result = json.loads((out / "demo.json").read_text())
    assert (out / "export" / "config.json").is_file() and result["train"]["steps"] == 2
    if env_ok:
        assert set(result["sts_after"]) == {"stsb-test", "avg"} and "| STS Spearman x100: stsb-test |" in proc.stdout
    assert result["generation"]["nll_reference/english"] > 0 and len(result["generation"]["samples"]) > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "summary.json").read_text())["mlflow_run_id"])
    assert "demo/generation/kl/english" in run.data.metrics
    if env_ok:
        assert "demo/sts_after/stsb-test" in run.data.metrics
