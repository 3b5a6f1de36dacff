import pytest
import torch

from sempa_dist import logprobs
from sempa_dist.logprobs import SequenceScorer, chunked_token_logprobs, sequence_logprobs
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


def test_chunking_bounds_the_logits_tensor():
    """No [N, vocab] tensor bigger than chunk x vocab is created by the LM head."""
    model = tiny_model("llama", vocab=97)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    batch = build_batch(random_examples(8, k=1, seed=8), "packed")
    with torch.no_grad():
        SequenceScorer(model, "sdpa", 10)(batch)
    assert max(seen) <= 10 and sum(seen) == len(batch.score_pos)


def test_a_trainable_head_holds_at_most_one_chunk_of_logits_for_backward():
    """Between forward and backward (where the trainer runs the reference model) a trainable head keeps
    the last chunk's logits only: the other chunks are checkpointed and recomputed one at a time."""
    head = torch.nn.Linear(32, 97, bias=False)
    hidden = torch.randn(25, 32, requires_grad=True)
    ids = torch.randint(0, 97, (25,))
    held: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():  # the weight is no activation
            held.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = chunked_token_logprobs(hidden, ids, head, 10)
    vocab_rows = [s[0] for s in held if len(s) == 2 and s[1] == 97]
    assert vocab_rows == [8]  # the last of 3 chunks (9, 8, 8): its logits, saved once
    lp.sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None


@pytest.mark.parametrize("frozen", [False, True])
def test_softmax_blocks_of_rows_give_full_logits_values_and_gradients(monkeypatch, frozen):
    """The in-place softmax runs over cache-sized blocks of rows (about 85 rows at vocab 49k); with a
    tiny vocab, shrink the block to 3 rows so 10 positions span four blocks, the last one partial."""
    monkeypatch.setattr(logprobs, "_BLOCK_ELEMENTS", 97 * 3)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 97, bias=False).requires_grad_(not frozen)
    hidden = torch.randn(10, 32, requires_grad=True)
    ids, weights = torch.randint(0, 97, (10,)), torch.randn(10)
    ref = head(hidden).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    ref_grads = (hidden.grad.clone(), None if frozen else head.weight.grad.clone())
    hidden.grad = head.weight.grad = None
    lp = chunked_token_logprobs(hidden, ids, head, 7)  # two chunks: 5 + 5 rows, each two blocks
    (lp * weights).sum().backward()
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_grads[0], atol=1e-6, rtol=1e-5)
    if not frozen:
        torch.testing.assert_close(head.weight.grad, ref_grads[1], atol=1e-6, rtol=1e-5)


def test_empty_selection_and_dummy_batch():
    model = tiny_model("llama")
    out = chunked_token_logprobs(torch.zeros(0, 32), torch.zeros(0, dtype=torch.long), model.lm_head, 4)
    assert out.shape == (0,)
    batch = build_batch([], "packed")
    sums, counts = sequence_logprobs(torch.zeros(1, 1, 32), batch, model.lm_head, 4)
    assert sums.shape == (0,) and counts.shape == (0,)


def test_dummy_batch_anchor_reaches_every_parameter():
    """A rank with no example left must still produce a gradient for every parameter (ZeRO-3)."""
    model = tiny_model("llama").train()
    out = SequenceScorer(model, "sdpa", 4)(build_batch([], "packed"))
    assert out.sums.numel() == 0 and out.anchor.item() == 0.0
    out.anchor.backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in model.parameters())


def test_frozen_head_gradients_match_full_logits_and_head_runs_once_per_chunk():
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
    calls = []
    model.lm_head.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    sums = SequenceScorer(model, "sdpa", 7)(batch).sums
    (sums * weights).sum().backward()
    torch.testing.assert_close(sums, ref, atol=1e-5, rtol=1e-6)
    assert_grads_close(model, ref_grads)
    assert sum(calls) == len(batch.score_pos) and max(calls) <= 7  # forward only: nothing recomputed


def test_a_fixed_chunk_count_with_empty_chunks_changes_nothing_but_the_head_calls():
    """Ranks of a ZeRO-3 engine agree on one chunk count (the most any of them needs), so a rank with
    fewer scored tokens splits them into more, smaller pieces, some empty. Values and gradients stay
    those of full logits, for a trainable and a frozen head; the head is called exactly `chunks` times."""
    for frozen in (False, True):
        model = tiny_model("llama").train()
        model.lm_head.weight.requires_grad_(not frozen)
        batch = build_batch(random_examples(2, k=1, seed=10, response_range=(1, 3)), "packed")
        ref = naive_sequence_logprobs(model, batch)
        (ref * torch.arange(1.0, 5.0)).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        calls: list[int] = []
        model.lm_head.register_forward_hook(lambda m, i, o, seen=calls: seen.append(o.shape[0]))
        n = len(batch.score_pos)
        scorer = SequenceScorer(model, "sdpa", 4)
        flat = scorer.hidden_states(batch).reshape(-1, 32)[batch.score_pos]
        lp = chunked_token_logprobs(flat, batch.score_ids, model.lm_head, 4, chunks=n + 3)
        sums = torch.zeros(4).index_add(0, batch.score_seq, lp)
        (sums * torch.arange(1.0, 5.0)).sum().backward()
        torch.testing.assert_close(sums, ref, atol=1e-5, rtol=1e-6)
        assert_grads_close(model, ref_grads)
        forward_calls = calls[: n + 3]  # a trainable head's chunks but the last run again in backward
        assert len(forward_calls) == n + 3 and sorted(forward_calls) == [0, 0, 0] + [1] * n
        assert len(calls) == (n + 3 if frozen else 2 * (n + 3) - 1)
    try:
        chunked_token_logprobs(torch.zeros(9, 32), torch.zeros(9, dtype=torch.long), model.lm_head, 4, chunks=2)
    except ValueError as e:
        assert "2 chunks of at most 4 tokens cannot hold 9 tokens" in str(e)
    else:
        raise AssertionError("too few chunks must be refused")
