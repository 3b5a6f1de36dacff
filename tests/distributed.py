"""Helpers for tests that start real processes (torchrun / sempa-train)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process a test starts: this checkout first on the path (whatever an
    editable install elsewhere points at), unbuffered output, then `extra`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **extra)


def run(cmd: list[str], timeout: int = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `cmd` from the repo root in its own session; raise with the output's tail on failure (if check)."""
    full_env = child_env(**(env or {}))
    # own session: on timeout the whole tree (launcher and every rank) is killed, never orphaned
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout}s:\n" + "\n".join((out + err).splitlines()[-40:])) from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def sempa_train(*args: str, timeout: int = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sempa_dist.cli.train", *args], timeout=timeout, env=env, check=check)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def start_sempa_train(log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """sempa-train running in a session of its own (a test can signal its whole group), output to `log`."""
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "sempa_dist.cli.train", *args], cwd=REPO,
                                env=child_env(**(env or {})), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def ranks_of(launcher: subprocess.Popen, n: int = 2, timeout: float = 60) -> list[psutil.Process]:
    """[rank 0, rank 1, ...] among sempa-train's descendants, by their RANK."""
    deadline = time.monotonic() + timeout
    while True:
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "sempa_dist.train" in " ".join(p.cmdline())]
        if len(ranks) == n:
            return sorted(ranks, key=lambda p: int(p.environ()["RANK"]))
        assert time.monotonic() < deadline and launcher.poll() is None, "ranks did not start"
        time.sleep(0.2)


def wait_for_steps(out: Path, n: int, launcher: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `out`'s metrics.jsonl has `n` rows; fails if training ends or stalls first."""
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= n):
        assert launcher.poll() is None, f"training ended before step {n}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {n} after {timeout}s"
        time.sleep(0.1)


def assert_same_run(rows: list[dict], reference: list[dict]) -> None:
    """An interrupted-and-resumed run logged every step exactly once, with the uninterrupted run's losses."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference]  # nothing lost, nothing logged twice
    for r, ref in zip(rows, reference, strict=True):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6), r["step"]
        assert r["rewards/margin"] == pytest.approx(ref["rewards/margin"], abs=1e-6), r["step"]


def assert_export_reproduces_probe(run_dir: Path) -> None:
    """The run's export/, loaded as a plain HF model, gives the log-probs the trained engine gave for
    the fixed probe batch (summary.json)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sempa_dist.config import load_config
    from sempa_dist.data import load_triplets, tokenize_triplets
    from sempa_dist.logprobs import SequenceScorer
    from sempa_dist.models import load_tokenizer
    from sempa_dist.packing import build_batch

    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(run_dir / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export", attn_implementation="sdpa")
    tok = load_tokenizer(cfg.model.name)
    examples, _ = tokenize_triplets(load_triplets(cfg.data, cfg.train.seed)[0], tok, cfg.data)
    batch = build_batch(examples[:4], "packed", tok.pad_token_id)
    assert batch.example_ids == summary["probe"]["example_ids"]
    with torch.no_grad():
        sums = SequenceScorer(model, "sdpa", 64)(batch).sums
    torch.testing.assert_close(sums, torch.tensor(summary["probe"]["sums"]), atol=1e-4, rtol=1e-5)
