"""sempa-eval (sempa_dist.cli.eval) in-process on the tiny random model and a few STS-B pairs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from sempa_dist.cli import eval as eval_cli
from sempa_dist.eval import sts

# The --lm-eval tests share test_harness's local tasks and hand-computed scores (fixtures included).
# Without lm-eval that module skips itself at import: those tests are skipped, the others still run.
with contextlib.suppress(pytest.skip.Exception):
    from tests.eval.test_harness import FEWSHOT, ZERO, hand_scores, local_tasks, no_env_report  # noqa: F401
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed: pip install -e '.[dev]' installs it")

needs_data = pytest.mark.skipif(not sts.data_available(), reason="STS data not found (set SEMPA_DATA_DIR to shared/data)")


@needs_data
@pytest.mark.data
def test_json_has_sts_scores(tmp_path, capsys):
    dest = tmp_path / "x.json"
    assert eval_cli.main(["tiny-llama", "--tasks", "stsb-test", "--max-pairs", "40", "--json", str(dest)]) == 0
    out = json.loads(dest.read_text())
    assert out["tasks"] == ["stsb-test"]
    assert out["pooling"] == "last" and out["normalize"] is True
    assert set(out["sts"]) == {"stsb-test", "avg"}
    for value in out["sts"].values():
        assert isinstance(value, float) and math.isfinite(value) and -100.0 <= value <= 100.0
    assert out["sts"]["avg"] == out["sts"]["stsb-test"]
    printed = capsys.readouterr().out
    assert "| stsb-test | avg |" in printed and f"{out['sts']['avg']:.2f}" in printed
    assert f"results: {dest}" in printed


@needs_data
@pytest.mark.data
def test_run_directory_evaluates_its_export_and_writes_beside_it(tmp_path):
    from sempa_dist.models import resolve_model

    run = tmp_path / "run"
    shutil.copytree(resolve_model("tiny-llama"), run / "export")
    (run / "summary.json").write_text("{}")
    assert eval_cli.main([str(run), "--tasks", "stsb", "--max-pairs", "20", "--pooling", "mean", "--no-normalize"]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert out["model"] == str(run / "export")
    assert out["tasks"] == ["stsb-test"]
    assert out["pooling"] == "mean" and out["normalize"] is False
    assert -100.0 <= out["sts"]["stsb-test"] <= 100.0


def test_unknown_task_returns_2(capsys):
    assert eval_cli.main(["tiny-llama", "--tasks", "stsb-test,sts99"]) == 2
    err = capsys.readouterr().err
    assert "sts99" in err and "stsb-test" in err


def test_run_without_export_exits_with_a_message(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([str(tmp_path), "--tasks", "stsb-test"])
    assert "has no export/" in str(exc.value.code) and str(tmp_path) in str(exc.value.code)
    assert not (tmp_path / "eval.json").exists()


def test_resolve_target():
    assert eval_cli.resolve_target("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)


def test_format_table():
    assert eval_cli.format_table({"sts12": 61.234, "avg": -5.0}) == "| sts12 | avg |\n|---|---|\n| 61.23 | -5.00 |"


# ----------------------------------------------------------------------------------------------
# --lm-eval: lm-evaluation-harness side by side, on the local tasks of tests/eval/test_harness.py


def _lm_eval_run(tmp_path, local_tasks, steps: int = 7) -> tuple[Path, str, str]:
    """A run directory as sempa-train leaves it, for what --lm-eval reads: export/ (the 'trained' model),
    config.yaml (model.name: the base, tracking.uri), summary.json (mlflow_run_id, steps), and its
    finished MLflow run in a sqlite store. Returns (run dir, tracking URI, run id)."""
    import yaml
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    shutil.copytree(local_tasks["models"]["trained"], run / "export")
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sempa", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id)  # training ended; evaluation logs to the finished run
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "tracking": {"uri": uri}}))
    (run / "summary.json").write_text(json.dumps({"mlflow_run_id": run_id, "steps": steps}))
    return run, uri, run_id


@needs_lm_eval
def test_lm_eval_on_a_run_compares_with_its_base_and_logs_to_its_mlflow_run(tmp_path, local_tasks, no_env_report,
                                                                            capsys):
    from mlflow.tracking import MlflowClient

    run, uri, run_id = _lm_eval_run(tmp_path, local_tasks)
    args = [str(run), "--tasks", "none", "--lm-eval", f"{FEWSHOT}:1", "--lm-eval-tasks-dir",
            str(local_tasks["tasks_dir"]), "--lm-eval-limit", "5"]
    assert eval_cli.main(args) == 0
    out = json.loads((run / "eval.json").read_text())
    assert out["model"] == str(run / "export") and out["tasks"] == [] and "sts" not in out
    report = out["lm_eval"]
    assert report["models"] == {"reference": local_tasks["models"]["reference"], "trained": str(run / "export")}
    assert report["tasks"] == [f"{FEWSHOT}:1"] and report["limit"] == 5 and report["n_samples"] == {FEWSHOT: 5}
    got = {}
    for label in ("reference", "trained"):
        want = hand_scores(local_tasks["lls"][label][FEWSHOT], local_tasks["labels"][FEWSHOT], n=5)
        got[label] = report["results"][label][FEWSHOT]
        assert got[label]["acc"] == pytest.approx(want["acc"]) and got[label]["acc_norm"] == pytest.approx(want["acc_norm"])
    printed = capsys.readouterr().out
    assert "| task | n-shot | metric | reference | trained | change |" in printed
    assert f"| {FEWSHOT} | 1 | acc | {got['reference']['acc']:.4f} ± " in printed
    assert f"lm-eval scores logged to MLflow run {run_id}" in printed
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data
    for label in ("reference", "trained"):
        assert logged.metrics[f"lm_eval/{label}/{FEWSHOT}/acc"] == pytest.approx(got[label]["acc"])
        assert logged.metrics[f"lm_eval/{label}/{FEWSHOT}/acc_norm_stderr"] == pytest.approx(got[label]["acc_norm_stderr"])
    assert [m.step for m in client.get_metric_history(run_id, f"lm_eval/trained/{FEWSHOT}/acc")] == [7]
    assert logged.tags["lm_eval.tasks"] == f"{FEWSHOT}:1" and logged.tags["lm_eval.limit"] == "5"
    assert client.get_run(run_id).info.status == "FINISHED"
    artifact = Path(client.download_artifacts(run_id, "lm_eval.json", str(tmp_path / "dl")))
    assert json.loads(artifact.read_text()) == report


@needs_lm_eval
def test_lm_eval_on_a_plain_model_is_one_column_and_not_logged(tmp_path, local_tasks, no_env_report, capsys):
    dest = tmp_path / "out.json"
    assert eval_cli.main([local_tasks["models"]["trained"], "--tasks", "none", "--lm-eval", ZERO,
                          "--lm-eval-tasks-dir", str(local_tasks["tasks_dir"]), "--lm-eval-limit", "2",
                          "--json", str(dest)]) == 0
    report = json.loads(dest.read_text())["lm_eval"]
    assert list(report["results"]) == ["model"] and report["n_shot"] == {ZERO: 0}
    want = hand_scores(local_tasks["lls"]["trained"][ZERO], local_tasks["labels"][ZERO], n=2)
    assert report["results"]["model"][ZERO]["acc"] == pytest.approx(want["acc"])
    printed = capsys.readouterr().out
    assert "lm-eval on the model alone (no --reference)" in printed
    assert "| task | n-shot | metric | model |" in printed
    assert "not logged to MLflow: MODEL is not a run directory" in printed


def test_lm_eval_run_without_tracking_is_a_note(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"mlflow_run_id": None}))
    assert "no mlflow_run_id" in eval_cli.run_tracking(run)
    (run / "summary.json").write_text(json.dumps({"mlflow_run_id": "abc"}))
    assert "no tracking URI" in eval_cli.run_tracking(run)
    (run / "tracking.json").write_text(json.dumps({"uri": "sqlite:///" + str(tmp_path / "gone.db")}))
    assert "does not exist here" in eval_cli.run_tracking(run)
    (run / "config.yaml").write_text("tracking:\n  uri: http://mlflow.example:5000\n")
    assert eval_cli.run_tracking(run) == ("http://mlflow.example:5000", "abc")  # the config's own URI wins


def test_lm_eval_missing_is_one_line_before_any_model_loads(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert eval_cli.main(["no/such/model", "--lm-eval", "mmlu:5"]) == 2
    err = capsys.readouterr().err
    assert err == "sempa-eval: lm-evaluation-harness is not installed: pip install 'sempa-dist[lm-eval]'\n"


@pytest.mark.parametrize(("argv", "needle"), [
    pytest.param(["--lm-eval", "mmlu:five"], "few-shot count of 'mmlu'", marks=needs_lm_eval),
    pytest.param(["--lm-eval", "mmlu", "--lm-eval-limit", "0"], "--lm-eval-limit must be >= 1", marks=needs_lm_eval),
    pytest.param(["--lm-eval", "mmlu", "--lm-eval-batch-size", "big"], "--lm-eval-batch-size must be", marks=needs_lm_eval),
    (["--tasks", "none"], "nothing to evaluate"),
])
def test_lm_eval_bad_arguments_return_2(argv, needle, capsys):
    assert eval_cli.main(["no/such/model", *argv]) == 2
    assert needle in capsys.readouterr().err
