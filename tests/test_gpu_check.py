"""bench/gpu_check.py cannot rot: its --cpu-dry-run runs every section's code end to end on CPU."""

import json
import sys

import pytest

from tests.distributed import run

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_passes_every_section_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run([sys.executable, "bench/gpu_check.py", "--cpu-dry-run", "--out", str(out)], timeout=300,
               env={"OMP_NUM_THREADS": "1"})
    report = json.loads(out.read_text())
    assert report["ok"] is True and "all ok: True" in proc.stdout
    assert report["usable_kernels"] == ["sdpa_varlen"]
    kernels = {(r["kernel"], r["arch"], r["k"]) for r in report["kernels"]}
    assert kernels == {(f"sdpa_varlen{s}", a, k) for s in ("", " + prefix sharing") for a in ("llama", "qwen2") for k in (1, 3)}
    assert all(r["err_logprob"] <= 1e-4 and r["err_grad_rel"] <= 1e-4 for r in report["kernels"])
    train = report["train"]
    assert train["steps"] == 4 and train["all_finite"] and train["loss_tail_mean"] < train["loss_first"]
    assert train["rng_round_trip"] and train["resolved"]["attn_implementation"] == "sdpa_varlen"
    cells = report["throughput"]["cells"]
    assert list(cells) == ["padded", "packed", "packed + prefix sharing"]
    assert all(c["examples_per_s"] > 0 for c in cells.values())
    assert report["throughput"]["auto"]["label"] == "sdpa_varlen + prefix sharing"
