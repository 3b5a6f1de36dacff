"""The generation check (sempa_dist.eval.generation) on the tiny random model, against plain HF forwards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sempa_dist.config import DataConfig
from sempa_dist.data.tokenize import render_prompt
from sempa_dist.eval.generation import compare_models, english_sample, greedy_paraphrases

PAIRS = [("a man is playing a guitar on the street .", "someone plays guitar outside ."),
         ("two dogs run through a grassy field .", "dogs are running .")]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    from sempa_dist.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def perturbed(model):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return other.eval()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return english_sample()[:3]


def sequences(tokenizer, pairs, texts) -> list[tuple[list[int], int]]:
    """(token ids, number of leading ids that are not scored) per sequence, as the module defines them:
    prompt -> response + eos for pairs, a text after its first token."""
    out = []
    for anchor, chosen in pairs:
        prompt = tokenizer(render_prompt(tokenizer, anchor, DataConfig()), add_special_tokens=False)["input_ids"]
        resp = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + resp, len(prompt)))
    for text in texts:
        out.append((tokenizer(text, add_special_tokens=False)["input_ids"], 1))
    return out


@torch.no_grad()
def scored_logprobs(model, ids: list[int], skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain HF forward of one sequence: log-softmax at the positions predicting ids[skip:], and those ids."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return F.log_softmax(logits[skip - 1 : -1], dim=-1), torch.tensor(ids[skip:])


def test_english_sample_is_non_empty_clean_text():
    sample = english_sample()
    assert len(sample) >= 20
    assert all(s and s == s.strip() for s in sample)
    assert len(set(sample)) == len(sample)


def test_same_model_has_zero_kl_and_no_nll_change(model, tiny_tokenizer, texts):
    got = compare_models(model, model, tiny_tokenizer, PAIRS, texts)
    for kind in ("responses", "english"):
        assert got[f"kl/{kind}"] == pytest.approx(0.0, abs=1e-6)
        assert got[f"nll_change/{kind}"] == 0.0
        assert got[f"nll_policy/{kind}"] == got[f"nll_reference/{kind}"] > 0
    seqs = sequences(tiny_tokenizer, PAIRS, texts)
    assert got["tokens/responses"] == sum(len(ids) - skip for ids, skip in seqs[: len(PAIRS)])
    assert got["tokens/english"] == sum(len(ids) - skip for ids, skip in seqs[len(PAIRS) :])


def test_only_the_kinds_given_are_reported(model, tiny_tokenizer, texts):
    assert set(compare_models(model, model, tiny_tokenizer, [], texts[:1])) == {
        "nll_policy/english", "nll_reference/english", "nll_change/english", "kl/english", "tokens/english"}
    assert "kl/responses" in compare_models(model, model, tiny_tokenizer, PAIRS[:1], [])


def test_perturbed_model_has_positive_kl_and_different_nll(model, perturbed, tiny_tokenizer, texts):
    got = compare_models(perturbed, model, tiny_tokenizer, PAIRS, texts)
    for kind in ("responses", "english"):
        assert got[f"kl/{kind}"] > 1e-3
        assert abs(got[f"nll_policy/{kind}"] - got[f"nll_reference/{kind}"]) > 1e-3
        pol, ref = got[f"nll_policy/{kind}"], got[f"nll_reference/{kind}"]
        assert got[f"nll_change/{kind}"] == pytest.approx((pol - ref) / ref)
    # the reference's numbers do not depend on the policy it is compared with
    same = compare_models(model, model, tiny_tokenizer, PAIRS, texts)
    assert got["nll_reference/english"] == pytest.approx(same["nll_policy/english"], abs=1e-6)


def test_nll_and_kl_match_a_plain_forward(model, perturbed, tiny_tokenizer, texts):
    got = compare_models(perturbed, model, tiny_tokenizer, [], texts[:1])
    (ids, skip), = sequences(tiny_tokenizer, [], texts[:1])
    lp_pol, target = scored_logprobs(perturbed, ids, skip)
    lp_ref, _ = scored_logprobs(model, ids, skip)
    assert got["tokens/english"] == len(target)
    assert got["nll_policy/english"] == pytest.approx(F.nll_loss(lp_pol, target).item(), abs=1e-5)
    assert got["nll_reference/english"] == pytest.approx(F.cross_entropy(
        model(torch.tensor([ids])).logits[0, skip - 1 : -1], target).item(), abs=1e-5)
    kl = (lp_pol.exp() * (lp_pol - lp_ref)).sum(-1).mean().item()  # KL(policy || reference) per token
    assert got["kl/english"] == pytest.approx(kl, abs=1e-5)


def test_response_nll_matches_a_plain_forward(model, perturbed, tiny_tokenizer):
    """Responses are scored after their chat-rendered paraphrase prompt, eos included; per-token mean over all pairs."""
    got = compare_models(perturbed, model, tiny_tokenizer, PAIRS, [])
    nll = {"policy": [], "reference": []}
    for ids, skip in sequences(tiny_tokenizer, PAIRS, []):
        for name, m in (("policy", perturbed), ("reference", model)):
            lp, target = scored_logprobs(m, ids, skip)
            nll[name].append(-lp.gather(-1, target[:, None]).squeeze(-1))
    for name in ("policy", "reference"):
        assert got[f"nll_{name}/responses"] == pytest.approx(torch.cat(nll[name]).mean().item(), abs=1e-5)


def test_packing_into_several_batches_changes_nothing(model, perturbed, tiny_tokenizer, texts):
    """batch_tokens = the longest sequence forces one micro-batch per few sequences; results must not move."""
    longest = max(len(ids) for ids, _ in sequences(tiny_tokenizer, PAIRS, texts))
    one = compare_models(perturbed, model, tiny_tokenizer, PAIRS, texts, batch_tokens=100_000)
    many = compare_models(perturbed, model, tiny_tokenizer, PAIRS, texts, batch_tokens=longest)
    assert set(one) == set(many)
    for key in one:
        assert many[key] == pytest.approx(one[key], abs=1e-5), key


def test_greedy_paraphrases_one_per_anchor_and_deterministic(model, tiny_tokenizer):
    anchors = [a for a, _ in PAIRS] + ["a third anchor ."]
    first = greedy_paraphrases(model, tiny_tokenizer, anchors, max_new_tokens=6)
    second = greedy_paraphrases(model, tiny_tokenizer, anchors, max_new_tokens=6)
    assert len(first) == len(anchors)
    assert all(isinstance(s, str) for s in first)
    assert first == second
    # the answer is the greedy continuation of the rendered prompt, prompt excluded
    ids = tiny_tokenizer(render_prompt(tiny_tokenizer, anchors[0], DataConfig()), add_special_tokens=False,
                         return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tiny_tokenizer.eos_token_id:
                break
    prompt_len = len(tiny_tokenizer(render_prompt(tiny_tokenizer, anchors[0], DataConfig()), add_special_tokens=False)["input_ids"])
    assert first[0] == tiny_tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()
