"""slurm/train_8x8.sh itself, submitted to a real two-node Slurm cluster started on this machine.

The script is the one for 8 nodes x 8 GPUs; only sbatch options scale it down (2 nodes, no GPUs,
one CPU rank per node: world size 2) and the tiny config replaces the real one. Where Slurm is not
installed the tests skip with the reason (`make test` installs it first: scripts/system_deps.sh).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sempa_dist.checkpoint import COMPLETE
from tests.distributed import REPO, metrics
from tests.slurm_cluster import TERMINAL_STATES, SlurmCluster, missing_reason, running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.real_component, pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]

SCRIPT = REPO / "slurm" / "train_8x8.sh"
STEPS = 12
# Everything that differs from the 8x8 cluster, as sbatch options (they override the #SBATCH lines):
# no GPUs -> the script picks one rank per node, the CPU accelerator and gloo.
SCALE_DOWN = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    with running_cluster(tmp_path_factory.mktemp("slurm"), n_nodes=2, cpus=2) as c:
        yield c


def submit(cluster: SlurmCluster, run_dir: Path, *overrides: str) -> int:
    """sbatch slurm/train_8x8.sh configs/tiny_cpu.yaml from the repo root (the submit directory)."""
    # two "nodes" share this machine's cores: one thread per rank
    env = {"SEMPA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return cluster.sbatch(*SCALE_DOWN, f"--output={run_dir / 'job.log'}", str(SCRIPT), "configs/tiny_cpu.yaml",
                          f"train.output_dir={run_dir / 'out'}", f"train.max_steps={STEPS}", "train.save_every=0",
                          *overrides, env=env, cwd=REPO)


def job_log(run_dir: Path) -> str:
    # tqdm redraws with \r: make every redraw a line of its own
    return (run_dir / "job.log").read_text(errors="replace").replace("\r", "\n")


def wait_until(cluster: SlurmCluster, job: int, done, what: str, timeout: float = 240) -> None:
    """Poll `done()` while the job is alive; fail if it ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not done():
        state = cluster.job(job).get("JobState")
        assert state not in TERMINAL_STATES, f"job {job} ended ({state}) before {what}"
        assert time.monotonic() < deadline, f"job {job}: no {what} in {timeout}s"
        time.sleep(0.2)


def steps_logged(out: Path) -> int:
    return len(metrics(out)) if (out / "metrics.jsonl").is_file() else 0


@pytest.fixture(scope="module")
def plain_run(cluster, tmp_path_factory) -> SimpleNamespace:
    """One job run to its end, no interruption: also the reference for the preempted one."""
    run_dir = tmp_path_factory.mktemp("plain")
    t0 = time.monotonic()
    job = submit(cluster, run_dir)
    info = cluster.wait_job(job, timeout=300)
    return SimpleNamespace(job=job, info=info, out=run_dir / "out", log=job_log(run_dir),
                           seconds=time.monotonic() - t0)


def only_mlflow_run(out):
    """The single MLflow run in the job's embedded store (<output_dir>/../mlflow.db), with a `loss`
    history of exactly one point per step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    return runs[0]


def test_job_trains_across_two_nodes(plain_run, cluster):
    info, log, out = plain_run.info, plain_run.log, plain_run.out
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:] + cluster.logs()
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    # one torchrun per node: srun --label prefixes every line of node i's task with "i: "
    assert "2 nodes (n1 n2) x 1 ranks, cpu" in log
    assert re.search(r"^0: ", log, re.M) and re.search(r"^1: ", log, re.M), log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and summary["start_step"] == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert (ckpts / f"step-{STEPS:06d}" / COMPLETE).is_file()
    assert (out / "export").is_dir() and not (out / "PREEMPTED").exists()
    run = only_mlflow_run(out)
    assert run.data.params["run.world_size"] == "2" and run.info.status == "FINISHED"
    assert run.info.run_id == summary["mlflow_run_id"]
    print(f"2-node job: {plain_run.seconds:.0f} s from sbatch to COMPLETED")


def test_preemption_checkpoints_requeues_and_resumes(cluster, plain_run, tmp_path):
    """Two interruptions of one job, then its end:
    1. USR1 to the batch shell (what --signal=B:USR1@180 sends 180 s before the time limit): the script
       forwards it, the ranks checkpoint at the step boundary, the script requeues the job;
    2. `scontrol requeue` from outside (an admin, a preemption policy): Slurm sends TERM to everything,
       the ranks checkpoint within KillWait, Slurm requeues;
    each next start resumes where the last stopped: every step exactly once, the uninterrupted losses."""
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, "train.export=false")
    out = tmp_path / "out"
    # in the loop (handlers installed), well before the end
    wait_until(cluster, job, lambda: steps_logged(out) >= 3, "step 3")
    cluster.cmd("scancel", "--batch", "--signal=USR1", str(job))
    # the second start resumed and trained two steps
    resumed = re.compile(r"resumed from \S+ at step (\d+)")
    wait_until(cluster, job, lambda: resumed.search(job_log(tmp_path)), "resume", timeout=300)
    first_stop = int(resumed.search(job_log(tmp_path)).group(1))
    wait_until(cluster, job, lambda: steps_logged(out) >= first_stop + 2, f"step {first_stop + 2}")
    cluster.scontrol("requeue", str(job))
    info = cluster.wait_job(job, timeout=300)
    log = job_log(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:] + cluster.logs()
    assert info["Restarts"] == "2", log[-3000:]
    assert "got SIGUSR1" in log and f"requeueing job {job}" in log
    assert "got SIGTERM" in log and "stopped by SIGTERM after a checkpoint" in log
    stops = [int(s) for s in re.findall(r"checkpoint at step (\d+) saved, exiting for requeue", log)]
    assert len(stops) == 2 and 3 <= stops[0] < stops[1] < STEPS, stops
    for step in stops:
        assert f"resumed from {out}/checkpoints/step-{step:06d} at step {step}" in log
    assert not (out / "PREEMPTED").exists()  # removed by the run that reached the end
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # nothing lost, nothing repeated
    reference = metrics(plain_run.out)
    for r, ref in zip(rows, reference, strict=True):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6), r["step"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == stops[1]
    run = only_mlflow_run(out)  # three starts of one job: one MLflow run, continued
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    print(f"stopped at steps {stops}, requeued twice, finished: {time.monotonic() - t0:.0f} s")
