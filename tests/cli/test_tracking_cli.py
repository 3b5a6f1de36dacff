"""sempa-tracking: a sweep's parent run, replay and end on the default store; the old module name;
and, end to end, a server killed mid-run and the replay that makes its run whole again."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from sempa_dist import tracking
from sempa_dist.cli import compare
from sempa_dist.cli.tracking import main
from sempa_dist.tracking import rundir
from tests.distributed import REPO, child_env, metrics
from tests.mlflow_server import MlflowServer


def steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in tracking.open_client(uri).get_metric_history(run_id, key))


def test_parent_replay_end_on_the_default_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # no --uri, no $MLFLOW_TRACKING_URI: the store sempa-train uses for its default run directory
    uri = f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert main(["parent", "beta-sweep"]) == 0
    parent = capsys.readouterr().out.strip()
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    run = tracking.open_client(uri).get_run(parent)
    assert run.info.run_name == "beta-sweep" and run.data.tags["run_kind"] == "sweep"
    # a trial's held-back values, sent by replay to the store its tracking.json names
    trial = tmp_path / "runs" / "trial"
    trial.mkdir()
    rundir.write_state(trial, {"uri": uri, "experiment": "sempa", "run_name": "trial", "run_id": None,
                               "parent_run_id": parent})
    rundir.append_jsonl(trial / rundir.PENDING, [{"op": "metrics", "data": [["loss", 0.5, 0, 1], ["loss", 0.4, 0, 2]]}])
    assert main(["replay", str(trial)]) == 0
    trial_id = rundir.read_state(trial)["run_id"]
    assert capsys.readouterr().out.strip() == f"sent 2 values to run {trial_id} in {uri}"
    assert steps(uri, trial_id) == [1, 2]
    assert tracking.open_client(uri).get_run(trial_id).data.tags["mlflow.parentRunId"] == parent
    assert main(["end", parent]) == 0
    assert tracking.open_client(uri).get_run(parent).info.status == "FINISHED"


def test_the_old_module_name_still_runs():
    out = subprocess.run([sys.executable, "-m", "sempa_dist.tracking", "--help"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: sempa-tracking" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_server_killed_mid_run_loses_nothing(tmp_path, capsys):
    """2-process training logs to a real server; the server is killed (SIGKILL) mid-run. Training
    finishes (exit 0) with a note; the fallback store has every step; after a restart on the same
    database, `sempa-tracking replay RUN_DIR` lands every step on the server."""
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
    assert "NOTE: the tracking store" in out and "sempa-tracking replay" in out, out[-3000:]
    assert (run_dir / "summary.json").is_file()
    state = json.loads((run_dir / tracking.STATE).read_text())
    assert steps(state["fallback"]["uri"], state["fallback"]["run_id"]) == list(range(1, total + 1))

    restarted = MlflowServer(tmp_path / "server", port=server.port)  # same database, same address
    restarted.start()
    try:
        subprocess.run([sys.executable, "-m", "sempa_dist.cli.tracking", "replay", str(run_dir)], cwd=REPO,
                       env=child_env(), check=True, timeout=120)
        assert steps(restarted.uri, state["run_id"]) == list(range(1, total + 1))
        run = tracking.open_client(restarted.uri).get_run(state["run_id"])
        assert run.info.status == "FINISHED"
        artifacts = [f.path for f in tracking.open_client(restarted.uri).list_artifacts(state["run_id"])]
        assert artifacts.count("summary.json") == 1
        # sempa-compare reads the server too
        capsys.readouterr()
        assert compare.main(["--uri", restarted.uri, "--format", "json"]) == 0
        (rec,) = json.loads(capsys.readouterr().out)
        assert rec["run_id"] == state["run_id"]
        assert math.isclose(rec["metrics"]["loss"]["final"], metrics(run_dir)[-1]["loss"], rel_tol=1e-6)
    finally:
        restarted.stop()
    print(f"server healthy in {started_in:.1f} s; {len(live)} steps live before the kill")
