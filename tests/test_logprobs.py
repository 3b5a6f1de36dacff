import weakref

import pytest
import torch

from sempa_dist import logprobs
from sempa_dist.logprobs import LMHeadLogprobs, SequenceScorer, chunked_token_logprobs, sequence_logprobs
from sempa_dist.packing import build_batch
from tests.tiny import random_examples, tiny_model


def naive_sequence_logprobs(model, batch):
    """Full [tokens, vocab] logits, the textbook way."""
    hidden = SequenceScorer(model, "sdpa", 1).hidden_states(batch)
    logp = model.lm_head(hidden).float().log_softmax(-1).reshape(-1, model.config.vocab_size)
    tok = logp[batch.score_pos].gather(-1, batch.score_ids.unsqueeze(-1)).squeeze(-1)
    sums = torch.stack([tok[batch.score_seq == s].sum() for s in range(batch.num_sequences)])
    return sums


def assert_grads_close(model, ref_grads: dict) -> None:
    """Gradients equal to fp32 accuracy. An embedding row's gradient sums many terms, so where they
    cancel near zero the error is a few ulps of the largest term, not of the element: atol scales with
    the tensor's largest reference gradient."""
    params = dict(model.named_parameters())
    for name, g in ref_grads.items():
        atol = 1e-6 * max(1.0, g.abs().max().item())
        torch.testing.assert_close(params[name].grad, g, atol=atol, rtol=1e-5, msg=name)


def test_chunked_values_and_gradients_match_full_logits():
    model = tiny_model("llama").train()
    batch = build_batch(random_examples(5, k=1, seed=7), "packed")
    ref = naive_sequence_logprobs(model, batch)
    weights = torch.randn(ref.shape)
    (ref * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for chunk in (1, 7, 1000):
        sums, counts, _ = SequenceScorer(model, "sdpa", chunk)(batch)
        torch.testing.assert_close(sums, ref, atol=1e-5, rtol=1e-6)
        (sums * weights).sum().backward()
        assert_grads_close(model, ref_grads)
        model.zero_grad()
    assert counts.tolist() == [len(r) for e in random_examples(5, k=1, seed=7) for r in e.responses]


def record_chunks(monkeypatch) -> list[int]:
    """Rows of every chunk of logits the LM head makes (forward and backward recompute)."""
    rows: list[int] = []
    make = logprobs._softmax_chunk

    def recording(h, *args):
        rows.append(h.shape[0])
        return make(h, *args)

    monkeypatch.setattr(logprobs, "_softmax_chunk", recording)
    return rows


def test_chunking_bounds_the_logits_tensor(monkeypatch):
    """No [N, vocab] tensor bigger than chunk x vocab is created by the LM head, and the head's module
    is not called: one LMHeadLogprobs call (what ZeRO-3 gathers the weight for) covers every chunk."""
    model = tiny_model("llama", vocab=97)
    rows = record_chunks(monkeypatch)
    head_calls, wrapper_calls = [], []
    model.lm_head.register_forward_hook(lambda m, i, o: head_calls.append(1))
    batch = build_batch(random_examples(8, k=1, seed=8), "packed")
    scorer = SequenceScorer(model, "sdpa", 10)
    scorer.head_logprobs.register_forward_hook(lambda m, i, o: wrapper_calls.append(1))
    with torch.no_grad():
        scorer(batch)
    assert max(rows) <= 10 and sum(rows) == len(batch.score_pos) and len(rows) > 2
    assert head_calls == [] and wrapper_calls == [1]


@pytest.mark.parametrize("frozen", [False, True])
def test_at_most_one_chunk_of_logits_exists_at_any_time(monkeypatch, frozen):
    """Every softmax buffer is gone before the next chunk's logits are made, in forward and in a
    trainable head's recompute. Between forward and backward (where the trainer runs the reference
    model) a trainable head keeps the last chunk's only; a frozen head keeps none."""
    buffers: list[weakref.ref] = []
    alive_at_each_new_chunk: list[int] = []
    softmax = logprobs._logprobs_and_softmax_

    def tracking(buf, ids):
        alive_at_each_new_chunk.append(sum(r() is not None for r in buffers))
        buffers.append(weakref.ref(buf))
        return softmax(buf, ids)

    monkeypatch.setattr(logprobs, "_logprobs_and_softmax_", tracking)
    rows = record_chunks(monkeypatch)
    head = torch.nn.Linear(32, 97, bias=False).requires_grad_(not frozen)
    hidden = torch.randn(25, 32, requires_grad=True)
    lp = chunked_token_logprobs(hidden, torch.randint(0, 97, (25,)), head, 10)
    kept = [b().shape for b in buffers if b() is not None]
    assert kept == ([] if frozen else [(5, 97)])  # chunks of 10, 10, 5: the last one's softmax
    lp.sum().backward()
    assert rows == ([10, 10, 5] if frozen else [10, 10, 5, 10, 10])  # backward: the last chunk first, kept
    assert alive_at_each_new_chunk == [0] * len(rows)
    assert all(b() is None for b in buffers)
    assert hidden.grad is not None and (frozen or head.weight.grad is not None)


@pytest.mark.parametrize("frozen", [False, True])
def test_softmax_blocks_of_rows_give_full_logits_values_and_gradients(monkeypatch, frozen):
    """The in-place softmax runs over cache-sized blocks of rows (about 85 rows at vocab 49k); with a
    tiny vocab, shrink the block to 3 rows so a chunk of 4 spans two blocks, the last one partial.
    Values and gradients (hidden, and a trainable head's weight and bias) equal full logits'."""
    monkeypatch.setattr(logprobs, "_BLOCK_ELEMENTS", 97 * 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 97, bias=True).requires_grad_(not frozen)
    hidden = torch.randn(10, 32, requires_grad=True)
    ids, weights = torch.randint(0, 97, (10,)), torch.randn(10)
    ref = head(hidden).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    ref_grads = [hidden.grad.clone()] + ([] if frozen else [head.weight.grad.clone(), head.bias.grad.clone()])
    hidden.grad = head.weight.grad = head.bias.grad = None
    lp = chunked_token_logprobs(hidden, ids, head, 4)  # three chunks: 4 + 4 + 2 rows, the first two in two blocks
    (lp * weights).sum().backward()
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-6)
    grads = [hidden.grad] + ([] if frozen else [head.weight.grad, head.bias.grad])
    for got, want in zip(grads, ref_grads, strict=True):  # the head's: summed over chunks into one buffer
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_empty_selection_and_dummy_batch():
    model = tiny_model("llama")
    out = chunked_token_logprobs(torch.zeros(0, 32), torch.zeros(0, dtype=torch.long), model.lm_head, 4)
    assert out.shape == (0,)
    batch = build_batch([], "packed")
    sums, counts = sequence_logprobs(torch.zeros(1, 1, 32), batch, LMHeadLogprobs(model.lm_head, 4))
    assert sums.shape == (0,) and counts.shape == (0,)


def test_dummy_batch_anchor_reaches_every_parameter():
    """A rank with no example left must still produce a gradient for every parameter (ZeRO-3)."""
    model = tiny_model("llama").train()
    out = SequenceScorer(model, "sdpa", 4)(build_batch([], "packed"))
    assert out.sums.numel() == 0 and out.anchor.item() == 0.0
    out.anchor.backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())


def test_frozen_head_gradients_match_full_logits_and_head_runs_once_per_chunk(monkeypatch):
    """LoRA freezes the LM head: its input gradient is taken in the forward pass, chunk by chunk.
    Values and decoder gradients must equal the full-logits computation; the head runs once per
    chunk (no recompute in backward)."""
    model = tiny_model("llama").train()
    model.lm_head.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    batch = build_batch(random_examples(5, k=1, seed=9), "packed", prefix_sharing=True)
    ref = naive_sequence_logprobs(model, batch)
    weights = torch.randn(ref.shape)
    (ref * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    calls = record_chunks(monkeypatch)
    sums = SequenceScorer(model, "sdpa", 7)(batch).sums
    (sums * weights).sum().backward()
    torch.testing.assert_close(sums, ref, atol=1e-5, rtol=1e-6)
    assert_grads_close(model, ref_grads)
    assert sum(calls) == len(batch.score_pos) and max(calls) <= 7  # forward only: nothing recomputed
