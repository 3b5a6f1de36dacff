"""The measured attention / prefix-sharing choice (kernel_choice.py): what is measured, and when not."""

import pytest
import torch

from sempa_dist.config import load_config
from sempa_dist.kernel_choice import Choice, candidates, choose_everywhere, label, measure, probe_examples
from sempa_dist.models import resolve_model
from tests.tiny import random_examples


def test_nothing_to_measure_without_a_gpu_or_with_an_explicit_config():
    """On CPU flex has no backward (torch 2.13) and flash-attn is GPU-only: auto/auto is sdpa_varlen with
    sharing, decided without a measurement; an explicit kernel or sharing setting is never overruled."""
    assert candidates("auto", "auto", "cpu") == [("sdpa_varlen", True)]
    assert candidates("sdpa", "off", "cpu") == [("sdpa", False)]
    assert candidates("eager", "auto", "cpu") == [("eager", True)]
    assert candidates("auto", "on", "cuda") == [("sdpa_varlen", True)]  # sharing fixed: the old rule decides
    if not torch.cuda.is_available():  # auto/auto on a GPU measures; here no GPU backs any candidate but sdpa_varlen
        assert candidates("auto", "auto", "cuda") == [("sdpa_varlen", True)]
    cfg = load_config(None, ["model.name=tiny-llama"])
    choice = choose_everywhere(cfg, random_examples(4, k=1), torch.device("cpu"), torch.float32)
    assert (choice.impl, choice.sharing, choice.seconds) == ("sdpa_varlen", True, {})
    assert choice.describe() == "attention: sdpa_varlen + prefix sharing"


def test_measure_times_one_decoder_layer_per_candidate_on_the_same_examples():
    """The measurement runs for real (here on CPU, with the two sdpa_varlen packings and the row mask):
    one timing per candidate, and the sharing candidate really packs fewer tokens."""
    examples = random_examples(8, k=3, seed=2, prompt_range=(20, 40), response_range=(2, 6))
    options = [("sdpa_varlen", True), ("sdpa_varlen", False), ("sdpa", True)]
    seconds = measure(resolve_model("tiny-llama"), examples, options, torch.device("cpu"), torch.float32, repeats=1)
    assert list(seconds) == [label(c) for c in options] == ["sdpa_varlen + prefix sharing", "sdpa_varlen", "sdpa + prefix sharing"]
    assert all(0 < s < 60 for s in seconds.values())
    chosen = Choice("sdpa_varlen", True, seconds)
    assert chosen.describe().startswith("attention: sdpa_varlen + prefix sharing (measured on one decoder layer")


def test_probe_takes_the_first_examples_that_one_unshared_micro_batch_holds():
    examples = random_examples(10, k=1, seed=4, prompt_range=(10, 10), response_range=(5, 5))  # 30 tokens each
    assert [ex.index for ex in probe_examples(examples, 100)] == [0, 1, 2]
    assert [ex.index for ex in probe_examples(examples, 10)] == [0]  # never empty


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex training needs a GPU (torch 2.13: no CPU backward)")
def test_on_a_gpu_flex_with_sharing_is_a_candidate_and_gets_measured():
    cfg = load_config(None, ["model.name=tiny-llama"])
    examples = random_examples(8, k=3, seed=2, prompt_range=(20, 40), response_range=(2, 6))
    choice = choose_everywhere(cfg, examples, torch.device("cuda"), torch.float32)
    assert "flex_varlen + prefix sharing" in choice.seconds
    assert choice.seconds[label((choice.impl, choice.sharing))] == min(choice.seconds.values())
