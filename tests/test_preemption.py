"""Preemption without Slurm: a signal mid-run -> checkpoint at the step boundary, PREEMPTED marker,
exit code 75; `train.resume=auto` then finishes the run with exactly the losses of an uninterrupted one.

Process tree of `sempa-train CONFIG` with train.nproc=2 (sempa_dist/local_launch.py):

    sempa-train (python -m sempa_dist.cli.train)        its own session (the test starts it so)
      rank 0, rank 1 (python -m sempa_dist.train)     the same process group

- a signal to the group reaches the ranks directly and through sempa-train, which forwards TERM,
  USR1, INT and HUP to its ranks (a signal to sempa-train alone is enough);
- the ranks checkpoint at the step boundary and exit 75; sempa-train waits for all and returns 75,
  the code the Slurm script requeues on.
A signal to one rank only works too: the flag is all-reduced with the step's metrics.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from sempa_dist.checkpoint import COMPLETE
from sempa_dist.preemption import PREEMPTED_EXIT_CODE
from tests.distributed import (
    assert_same_run,
    metrics,
    ranks_of,
    sempa_train,
    start_sempa_train,
    wait_for_steps,
)

pytestmark = pytest.mark.slow

STEPS = 12
ARGS = ["configs/tiny_cpu.yaml", f"train.max_steps={STEPS}", "train.save_every=0", "train.export=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The same run, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    sempa_train(*ARGS, f"train.output_dir={out}")
    return metrics(out)


@pytest.mark.parametrize("how", ["usr1_to_one_rank", "term_to_launcher_group", "usr1_to_launcher_group"])
def test_signal_checkpoints_then_resume_matches_uninterrupted(reference, tmp_path, how):
    out, log = tmp_path / "run", tmp_path / "train.log"
    launcher = start_sempa_train(log, *ARGS, f"train.output_dir={out}")
    try:
        ranks = ranks_of(launcher)
        wait_for_steps(out, 3, launcher, log)
        if how == "usr1_to_one_rank":
            # rank 1 only: the flag is all-reduced with the step's metrics, so rank 0 stops at the same step
            ranks[1].send_signal(signal.SIGUSR1)
        else:
            sig = signal.SIGTERM if how.startswith("term") else signal.SIGUSR1
            os.killpg(launcher.pid, sig)  # sempa-train (forwards it) and the ranks
        rc = launcher.wait(timeout=120)
        _, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, f"still running: {alive}"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    # sempa-train returns 75 only when every rank exited 75 (or 0), and reports no failure
    assert rc == PREEMPTED_EXIT_CODE, text[-3000:]
    assert "stopping the other ranks" not in text, text[-3000:]

    marker = json.loads((out / "PREEMPTED").read_text())
    stopped = marker["step"]
    assert 3 <= stopped < STEPS, marker
    ckpt = out / "checkpoints" / f"step-{stopped:06d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert (ckpt / COMPLETE).is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == stopped
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped + 1))  # logged == checkpointed

    sempa_train(*ARGS, f"train.output_dir={out}", "train.resume=auto")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert_same_run(metrics(out), reference)
    assert not (out / "PREEMPTED").exists()
    assert json.loads((out / "summary.json").read_text())["start_step"] == stopped
