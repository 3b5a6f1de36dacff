"""sempa-compare on two real 2-process training runs (loss.beta 0.1 vs 0.2) in the default local store."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from sempa_dist import tracking
from sempa_dist.cli import compare
from tests.distributed import metrics, sempa_train

pytestmark = pytest.mark.slow

BETAS = ("0.1", "0.2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two short runs side by side; no tracking.uri, so both land in <root>/mlflow.db."""
    root = tmp_path_factory.mktemp("compare")
    for beta in BETAS:
        sempa_train("configs/tiny_cpu.yaml", f"train.output_dir={root}/beta{beta}", f"loss.beta={beta}",
                    "train.max_steps=6", "train.save_every=0", "train.export=false", env={"MLFLOW_TRACKING_URI": ""})
    return root


def run_compare(capsys, *args: str) -> str:
    capsys.readouterr()
    assert compare.main(list(args)) == 0
    return capsys.readouterr().out


def test_runs_land_in_the_default_store_next_to_them(runs):
    uri = f"sqlite:///{runs.resolve()}/mlflow.db"
    for beta in BETAS:
        run_dir = runs / f"beta{beta}"
        state = json.loads((run_dir / tracking.STATE).read_text())
        assert state["uri"] == uri and state["status"] == "FINISHED" and not (run_dir / tracking.PENDING).exists()
        assert json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"] == state["run_id"]
        ckpt_state = json.loads((run_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
        assert ckpt_state["mlflow_run_id"] == state["run_id"]
        run = tracking.open_client(uri).get_run(state["run_id"])
        assert run.data.params["loss.beta"] == beta and run.data.tags["run_kind"] == "train"
        assert run.data.params["dataset.fingerprint"] and int(run.data.params["dataset.kept"]) > 0
        assert run.data.metrics["summary/steps"] == 6
        # every logged step, every metric of the loop's row
        history = tracking.open_client(uri).get_metric_history(state["run_id"], "rewards/margin")
        assert sorted(m.step for m in history) == [r["step"] for r in metrics(run_dir)]
        artifacts = runs / "mlartifacts" / "sempa" / state["run_id"] / "artifacts"  # next to the store, not in the cwd
        assert {p.name for p in artifacts.iterdir()} == {"config.yaml", "dataset.json", "deepspeed.json", "summary.json"}


def test_formats_show_the_differing_param_and_both_runs(runs, capsys):
    uri = f"sqlite:///{runs}/mlflow.db"
    for fmt in ("table", "markdown"):
        out = run_compare(capsys, "--uri", uri, "--format", fmt)
        header = out.splitlines()[0]
        assert "loss.beta" in header and "loss best" in header and "rewards/accuracy" in header
        assert "beta0.1" in out and "beta0.2" in out
        assert "train.output_dir" not in header and "loss.type" not in header  # equal params are not shown
    rows = list(csv.DictReader(io.StringIO(run_compare(capsys, "--uri", uri, "--format", "csv"))))
    assert sorted(r["loss.beta"] for r in rows) == list(BETAS)
    final = {r["run"]: float(r["loss"]) for r in rows}
    for beta in BETAS:
        assert final[f"beta{beta}"] == pytest.approx(metrics(runs / f"beta{beta}")[-1]["loss"], rel=1e-9)
    records = json.loads(run_compare(capsys, "--uri", uri, "--format", "json"))
    assert {rec["params"]["loss.beta"] for rec in records} == set(BETAS)
    for rec in records:
        loss = rec["metrics"]["loss"]
        assert loss["best"] <= loss["final"] and loss["final_step"] == 6
        assert rec["metrics"]["rewards/accuracy"]["best"] >= rec["metrics"]["rewards/accuracy"]["final"]


def test_selection_and_sorting(runs, capsys):
    uri = f"sqlite:///{runs}/mlflow.db"
    rows = list(csv.DictReader(io.StringIO(run_compare(capsys, "--uri", uri, "--format", "csv", "--sort", "loss.beta:desc"))))
    assert [r["loss.beta"] for r in rows] == ["0.2", "0.1"]
    out = run_compare(capsys, "--uri", uri, "--format", "csv", "--experiment", "sempa", "--name", "beta0.2")
    assert [r["run"] for r in csv.DictReader(io.StringIO(out))] == ["beta0.2"]
    out = run_compare(capsys, "--uri", uri, "--format", "csv", "--filter", "params.`loss.beta` = '0.1'")
    assert [r["run"] for r in csv.DictReader(io.StringIO(out))] == ["beta0.1"]
    out = run_compare(capsys, "--format", "json", str(runs / "beta0.1"), str(runs / "beta0.2"))  # run directories
    assert sorted(rec["run_name"] for rec in json.loads(out)) == ["beta0.1", "beta0.2"]


def test_plot_writes_a_png(runs, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "plots" / "curves.png"
    run_compare(capsys, "--uri", f"sqlite:///{runs}/mlflow.db", "--plot", str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # not a blank canvas
