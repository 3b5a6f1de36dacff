"""Runs that cannot write their checkpoint fail before any process starts."""

import subprocess
import sys

import pytest

from sempa_dist.checkpoint import COMPLETE
from sempa_dist.config import load_config
from sempa_dist.preflight import (
    PreflightError,
    check_fresh_run,
    check_writable,
    estimate_checkpoint_bytes,
    preflight,
)
from tests.distributed import REPO, sempa_train


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match=r"train.output_dir: .*a-file/run is not writable"):
        check_writable(blocker / "run")
    proc = sempa_train("configs/tiny_cpu.yaml", f"train.output_dir={blocker}/run", check=False, timeout=60)
    assert proc.returncode == 2 and "is not writable" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # refused before any launcher started


def test_fresh_run_refuses_another_runs_checkpoints(tmp_path):
    check_fresh_run("never", tmp_path)  # empty directory: fine
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    check_fresh_run("never", tmp_path)  # debris of a crashed save is no checkpoint
    (tmp_path / "checkpoints" / "step-000004" / COMPLETE).write_text("ok\n")
    with pytest.raises(PreflightError, match=r"already holds checkpoints of an earlier run \(step-000004\)"):
        check_fresh_run("never", tmp_path)
    check_fresh_run("auto", tmp_path)  # continuing it is what resume is for


def test_checkpoint_estimate_counts_what_is_trained():
    full = load_config(None, ["model.name=tiny-llama", "model.dtype=fp32"])
    lora = load_config(None, ["model.name=tiny-llama", "model.dtype=fp32", "model.lora.enabled=true"])
    f, lo = estimate_checkpoint_bytes(full), estimate_checkpoint_bytes(lora)
    assert f > lo > 0
    assert f % 16 == 0  # all weights trained: 4 bytes of weight + 12 of Adam state each
    assert estimate_checkpoint_bytes(load_config(None, ["model.name=some-org/not-local"])) == 0


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB tmpfs (needs root; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_too_little_disk_fails_before_training(small_fs):
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [f"train.output_dir={small_fs}/run"])
    with pytest.raises(PreflightError, match=r"MiB free, one checkpoint of tiny-llama needs about"):
        preflight(cfg)
    proc = subprocess.run([sys.executable, "-m", "sempa_dist.cli.train", "configs/tiny_cpu.yaml",
                           f"train.output_dir={small_fs}/run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs about" in proc.stderr, proc.stderr[-2000:]


def test_an_attention_kernel_this_machine_cannot_train_with_is_refused_before_launch(tmp_path):
    """The flash kernels need a GPU, bf16 and their package; flex attention has no backward on CPU
    (torch 2.13). Either is one line naming the key, before any rank starts."""
    import torch

    from sempa_dist.attention import unusable_reason
    from sempa_dist.distributed import device_type

    device = device_type()
    for impl in ("flex_varlen", "fa2_varlen", "torch_varlen"):
        if unusable_reason(impl, device, torch.bfloat16) is None:
            continue
        dtype = [] if impl == "flex_varlen" else ["model.dtype=bf16"]  # fp32 with a flash kernel: a config error
        proc = sempa_train("configs/tiny_cpu.yaml", f"train.output_dir={tmp_path / impl}",
                           f"model.attn_implementation={impl}", *dtype, check=False, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"sempa-train: model.attn_implementation={impl}" in proc.stderr
        assert "torch.distributed" not in proc.stderr and not (tmp_path / impl / "metrics.jsonl").exists()
