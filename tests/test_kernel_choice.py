"""The attention kernel / prefix-sharing choice (kernel_choice.py): what is measured, when not, and what
happens when a candidate fails."""

import sys

import pytest
import torch

from sempa_dist.config import load_config
from sempa_dist.distributed import free_port
from sempa_dist.kernel_choice import (
    AttentionChoice,
    candidates,
    choose_everywhere,
    label,
    measure,
    probe_examples,
)
from sempa_dist.models import resolve_model
from tests.distributed import run
from tests.tiny import random_examples


def test_nothing_to_measure_without_a_gpu_or_with_an_explicit_config():
    """On CPU flex has no backward (torch 2.13) and the flash kernels are GPU-only: auto/auto is
    sdpa_varlen with sharing, decided without a measurement; an explicit setting is never overruled."""
    assert candidates("auto", "auto", "cpu", torch.float32) == [("sdpa_varlen", True)]
    assert candidates("sdpa", "off", "cpu", torch.float32) == [("sdpa", False)]
    assert candidates("eager", "auto", "cpu", torch.float32) == [("eager", True)]
    cfg = load_config(None, ["model.name=tiny-llama"])
    choice = choose_everywhere(cfg, random_examples(4, k=1), torch.device("cpu"), torch.float32)
    assert choice == AttentionChoice("sdpa_varlen", True)
    assert choice.describe() == "attention: sdpa_varlen + prefix sharing"
    assert choice.record() == {"attn_implementation": "sdpa_varlen", "prefix_sharing": True, "measured_s": {}, "failed": {}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharing_on_or_off_is_kept_by_every_gpu_candidate(dtype):
    """With prefix_sharing on, auto picks among kernels that share (every kernel can now); off, among
    none that do. Holds on any machine: the list is what this machine's GPU (if any) offers."""
    on = candidates("auto", "on", "cuda", dtype)
    off = candidates("auto", "off", "cuda", dtype)
    assert on and all(share for _, share in on) and off and not any(share for _, share in off)
    assert [impl for impl, _ in on] == [impl for impl, _ in off]
    assert on[-1] == ("sdpa_varlen", True)  # the reference kernel runs anywhere: always a candidate


def test_measure_times_each_candidate_and_skips_one_that_fails():
    """The measurement runs for real (on CPU here): one timing per candidate that runs, the sharing
    candidate really packs fewer tokens, and a candidate that raises (fa2_varlen: no flash-attn here) is
    recorded with its error instead of stopping the others."""
    examples = random_examples(8, k=3, seed=2, prompt_range=(20, 40), response_range=(2, 6))
    options = [("sdpa_varlen", True), ("fa2_varlen", False), ("sdpa_varlen", False), ("sdpa", True)]
    seconds, failed = measure(resolve_model("tiny-llama"), examples, options, torch.device("cpu"), torch.float32, repeats=1)
    assert list(seconds) == ["sdpa_varlen + prefix sharing", "sdpa_varlen", "sdpa + prefix sharing"]
    assert all(s > 0 for s in seconds.values())
    assert list(failed) == ["fa2_varlen"] and "Error" in failed["fa2_varlen"]
    chosen = AttentionChoice("sdpa_varlen", True, seconds, failed)
    line = chosen.describe()
    assert line.startswith("attention: sdpa_varlen + prefix sharing (measured on one decoder layer")
    assert "fa2_varlen failed (" in line


def test_probe_takes_the_first_examples_that_one_unshared_micro_batch_holds():
    examples = random_examples(10, k=1, seed=4, prompt_range=(10, 10), response_range=(5, 5))  # 30 tokens each
    assert [ex.index for ex in probe_examples(examples, 100)] == [0, 1, 2]
    assert [ex.index for ex in probe_examples(examples, 10)] == [0]  # never empty


def test_a_failed_choice_on_rank_0_reaches_every_rank_instead_of_a_hang(tmp_path):
    """Rank 0 measures and broadcasts; when it fails, the other ranks get its error from the broadcast
    (before: rank 0 raised and its peers waited in the broadcast until the collective timeout)."""
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "tests/scripts/choice_failure.py"], timeout=120, env={"OMP_NUM_THREADS": "1"})
    lines = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("RANK"))
    assert lines[0] == "RANK0 RuntimeError: model.attn_implementation: every candidate kernel failed on this machine: fa2_varlen: boom"
    assert lines[1].startswith("RANK1 RuntimeError: rank 0 could not choose the attention kernel: RuntimeError: "
                               "model.attn_implementation: every candidate")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex training needs a GPU (torch 2.13: no CPU backward)")
def test_on_a_gpu_the_kernels_are_measured_with_and_without_sharing():
    cfg = load_config(None, ["model.name=tiny-llama"])
    examples = random_examples(8, k=3, seed=2, prompt_range=(20, 40), response_range=(2, 6))
    choice = choose_everywhere(cfg, examples, torch.device("cuda"), torch.bfloat16)
    assert "sdpa_varlen + prefix sharing" in choice.seconds and "sdpa_varlen" in choice.seconds
    assert label((choice.impl, choice.sharing)) in choice.seconds
