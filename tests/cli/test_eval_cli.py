"""sempa-eval (sempa_dist.cli.eval) in-process on the tiny random model and a few STS-B pairs."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from sempa_dist.cli import eval as eval_cli
from sempa_dist.eval import sts

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
