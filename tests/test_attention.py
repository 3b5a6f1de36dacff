"""Packed rows must compute exactly what separate sequences (and a padded batch) compute."""

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from sempa_dist.attention import attention_inputs, block_causal_mask, resolve_attn_implementation
from sempa_dist.logprobs import SequenceScorer
from sempa_dist.packing import build_batch
from tests.tiny import random_examples, tiny_model


def per_token_logprobs(scorer: SequenceScorer, batch) -> list[torch.Tensor]:
    """Per-token response log-probs of every sequence of `batch` (full logits: the naive way)."""
    with torch.no_grad():
        hidden = scorer.hidden_states(batch)
        logits = scorer.model.get_output_embeddings()(hidden).float().log_softmax(-1)
    flat = logits.reshape(-1, logits.shape[-1])[batch.score_pos]
    lp = flat.gather(-1, batch.score_ids.unsqueeze(-1)).squeeze(-1)
    return [lp[batch.score_seq == s] for s in range(batch.num_sequences)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa_varlen", "flex_varlen", "sdpa", "eager"])
def test_packed_equals_separate_and_padded(arch, impl):
    model = tiny_model(arch, impl)
    scorer = SequenceScorer(model, impl, chunk_tokens=16)
    exs = random_examples(6, k=2, seed=3, prompt_range=(2, 40), response_range=(1, 15))
    packed = per_token_logprobs(scorer, build_batch(exs, "packed"))
    padded = per_token_logprobs(scorer, build_batch(exs, "padded"))
    s = 0
    for ex in exs:
        for r in range(3):
            alone = per_token_logprobs(scorer, build_batch([type(ex)(ex.prompt_ids, [ex.responses[r]], 0)], "packed"))[0]
            assert alone.shape == packed[s].shape == (len(ex.responses[r]),)
            torch.testing.assert_close(packed[s], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(padded[s], alone, atol=1e-5, rtol=0)
            s += 1


def test_position_ids_alone_do_not_isolate_sequences_under_sdpa():
    """Why the block mask exists: without it the second sequence sees the first."""
    model = tiny_model("llama", "sdpa")
    exs = random_examples(2, k=0, seed=4)
    batch = build_batch(exs, "packed")
    with torch.no_grad():
        masked = model.model(input_ids=batch.input_ids, **attention_inputs(batch, "sdpa")).last_hidden_state
        unmasked = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    assert (masked - unmasked).abs().max() > 1e-3


def varlen_reference_attention(q, k, v, cu_seqlens):
    """What flash_attn_varlen_func computes: causal attention within each [cu[i], cu[i+1]) segment."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        out[:, a:b] = F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True)
    return out


def test_flash_varlen_inputs_define_the_same_attention_as_the_cpu_mask():
    """The GPU path gets cu_seq_lens; the CPU path a block mask. Both must mean the same attention,
    and our offsets must equal what transformers derives from the restarting position_ids."""
    exs = random_examples(5, k=1, seed=5)
    batch = build_batch(exs, "packed")
    kw = attention_inputs(batch, "flash_attention_2")
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids)
    assert kw["cu_seq_lens_q"].tolist() == cu_q.tolist() == cu_k.tolist()
    assert kw["max_length_q"] == int(max_q)
    torch.manual_seed(0)
    n = batch.input_ids.shape[1]
    q, k, v = (torch.randn(2, n, 8) for _ in range(3))
    mask = block_causal_mask(batch.seq_lens, n)[0]
    via_mask = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(via_mask, varlen_reference_attention(q, k, v, kw["cu_seq_lens_q"]), atol=1e-6, rtol=0)


def test_auto_attention_is_sdpa_varlen_without_flash_and_explicit_flash_fails_clearly():
    assert resolve_attn_implementation("auto") == "sdpa_varlen"
    with pytest.raises(RuntimeError, match="flash-attn"):
        resolve_attn_implementation("flash_attention_2")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("impl", ["sdpa_varlen", "sdpa", "eager"])
def test_prefix_sharing_equals_separate_sequences_values_and_gradients(arch, k, impl):
    """Prompt encoded once for its 1 + K responses == each prompt + response run alone (fp32), for
    per-response log-probs, their gradients, and the preference loss built on them."""
    from sempa_dist.loss import preference_loss

    model = tiny_model(arch, impl).train()
    scorer = SequenceScorer(model, impl, chunk_tokens=8)
    exs = random_examples(5, k=k, seed=11, prompt_range=(2, 30), response_range=(1, 12))
    weights = torch.randn(len(exs) * (k + 1))

    def run(batch):
        model.zero_grad()
        sums = scorer(batch).sums
        (sums * weights).sum().backward()
        return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared_sums, shared_grads = run(build_batch(exs, "packed", prefix_sharing=True))
    plain_sums, plain_grads = run(build_batch(exs, "packed"))
    alone = torch.stack([scorer(build_batch([type(ex)(ex.prompt_ids, [r], 0)], "packed")).sums[0].detach()
                         for ex in exs for r in ex.responses])
    torch.testing.assert_close(shared_sums, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_sums, plain_sums, atol=1e-5, rtol=0)
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    ref = plain_sums - 0.5
    loss_shared, _ = preference_loss(shared_sums.view(-1, k + 1), ref.view(-1, k + 1), 0.1, "plackett_luce")
    loss_plain, _ = preference_loss(plain_sums.view(-1, k + 1), ref.view(-1, k + 1), 0.1, "plackett_luce")
    torch.testing.assert_close(loss_shared, loss_plain, atol=1e-6, rtol=0)
    padded_shared = scorer(build_batch(exs, "padded", prefix_sharing=True)).sums.detach()
    torch.testing.assert_close(padded_shared, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
def test_flex_block_mask_with_prefix_sharing_equals_separate_sequences(arch, k):
    """flex_varlen's BlockMask (the GPU kernel with sibling masking) computes what each prompt +
    response computes alone. Values only: torch 2.13 has no flex backward on CPU; the gradient is
    flex's own on a GPU, the mask is what is ours."""
    model = tiny_model(arch, "flex_varlen")
    scorer = SequenceScorer(model, "flex_varlen", chunk_tokens=8)
    exs = random_examples(5, k=k, seed=11, prompt_range=(2, 30), response_range=(1, 12))
    with torch.no_grad():
        shared = scorer(build_batch(exs, "packed", prefix_sharing=True)).sums
        padded_shared = scorer(build_batch(exs, "padded", prefix_sharing=True)).sums
        alone = torch.stack([scorer(build_batch([type(ex)(ex.prompt_ids, [r], 0)], "packed")).sums[0]
                             for ex in exs for r in ex.responses])
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_shared, alone, atol=1e-5, rtol=0)
    # element for element, the block mask's rule is the row mask's (the one sdpa/eager are tested with)
    for layout in ("packed", "padded"):
        batch = build_batch(exs, layout, prefix_sharing=True)
        rows, n = batch.input_ids.shape
        block = attention_inputs(batch, "flex_varlen")["block_mask"]
        q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
        got = torch.stack([block.mask_mod(torch.tensor(r), torch.tensor(0), q, kv) for r in range(rows)])
        assert torch.equal(got, block_causal_mask(batch.seq_lens, n, batch.branch)[:, 0])


def test_flex_training_on_cpu_is_refused_up_front():
    from sempa_dist.attention import flex_backward_supported

    if flex_backward_supported("cpu"):
        assert resolve_attn_implementation("flex_varlen") == "flex_varlen"
    else:
        with pytest.raises(RuntimeError, match="cannot train through flex attention on cpu"):
            resolve_attn_implementation("flex_varlen")


def test_prefix_sharing_mask_hides_siblings():
    """Without the branch term a response would see its siblings: the mask is what makes sharing exact."""
    exs = random_examples(1, k=2, seed=12, prompt_range=(3, 4), response_range=(2, 3))
    b = build_batch(exs, "packed", prefix_sharing=True)
    n = b.input_ids.shape[1]
    mask = block_causal_mask(b.seq_lens, n, b.branch)[0, 0]
    br = b.branch[0]
    for q in range(n):
        for kk in range(n):
            expected = kk <= q and (br[kk] == 0 or br[kk] == br[q])
            assert bool(mask[q, kk]) == bool(expected), (q, kk)
    with pytest.raises(ValueError, match="flash-attn varlen cannot"):
        attention_inputs(b, "flash_attention_2")


@pytest.mark.parametrize("sharing", [False, True])
def test_sdpa_varlen_attends_per_segment_without_a_row_by_row_mask(sharing):
    """The point of sdpa_varlen: attention costs sum(segment^2), not row^2; and outside a packed
    forward (no segments: STS encoding with a padding mask) it is exactly sdpa."""
    exs = random_examples(6, k=2, seed=5, prompt_range=(2, 20), response_range=(1, 8))
    batch = build_batch(exs, "packed", prefix_sharing=sharing)
    kw = attention_inputs(batch, "sdpa_varlen")
    assert "attention_mask" not in kw
    seg = kw["segments"]
    n_segments = sum(len(r) for r in batch.seq_lens)
    longest = max(max(r) for r in batch.seq_lens)
    assert seg.mask.shape == (n_segments, 1, longest, longest)
    assert seg.valid.sum().item() == batch.real_tokens
    assert seg.mask.numel() < batch.input_ids.numel() ** 2 / 3  # vs the [row, row] mask of sdpa

    ids = torch.randint(1, 90, (3, 11))
    pad = torch.ones_like(ids)
    pad[1, 7:] = 0
    with torch.no_grad():
        a = tiny_model("llama", "sdpa_varlen").model(input_ids=ids, attention_mask=pad).last_hidden_state
        b = tiny_model("llama", "sdpa").model(input_ids=ids, attention_mask=pad).last_hidden_state
    torch.testing.assert_close(a[pad.bool()], b[pad.bool()], atol=1e-6, rtol=0)
