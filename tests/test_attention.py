"""Packed rows must compute exactly what separate sequences (and a padded batch) compute, under every
kernel; the varlen contract (bottom-right causal, q != k lengths, grouped-query heads) is checked
against a loop that spells it out, and the GPU kernels' call adapters against their documented APIs."""

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from sempa_dist import attention
from sempa_dist.attention import (
    VarlenLayout,
    attention_inputs,
    block_causal_mask,
    reference_varlen,
    resolve_attn_implementation,
    usable_implementations,
)
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


def alone(ex, r: int):
    """Response r of `ex` as an example of its own (prompt + that response)."""
    return type(ex)(ex.prompt_ids, [ex.responses[r]], 0)


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
            one = per_token_logprobs(scorer, build_batch([alone(ex, r)], "packed"))[0]
            assert one.shape == packed[s].shape == (len(ex.responses[r]),)
            torch.testing.assert_close(packed[s], one, atol=1e-5, rtol=0)
            torch.testing.assert_close(padded[s], one, atol=1e-5, rtol=0)
            s += 1


def test_position_ids_alone_do_not_isolate_sequences_under_sdpa():
    """Why the masks and the varlen layout exist: without them the second sequence sees the first."""
    model = tiny_model("llama", "sdpa")
    exs = random_examples(2, k=0, seed=4)
    batch = build_batch(exs, "packed")
    with torch.no_grad():
        masked = model.model(input_ids=batch.input_ids, **attention_inputs(batch, "sdpa")).last_hidden_state
        unmasked = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    assert (masked - unmasked).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# The contract


def contract_by_loop(q, k, v, cu_q, cu_k, scale=None):
    """The varlen contract spelled out: per segment and head, softmax over the keys that query j may see,
    keys 0 .. j + (nk - nq) (bottom-right causal), K/V head h // (heads / kv_heads)."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for s in range(len(cu_q) - 1):
        qa, qb, ka, kb = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        nq, nk = qb - qa, kb - ka
        for h in range(q.shape[1]):
            for j in range(nq):
                last = j + nk - nq
                keys, values = k[ka:ka + last + 1, h // groups], v[ka:ka + last + 1, h // groups]
                w = torch.softmax(keys @ q[qa + j, h] * scale, dim=0)
                out[qa + j, h] = w @ values
    return out


def random_segments(q_lens, k_lens, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(k_lens), kv_heads, dim, generator=g)
    v = torch.randn(sum(k_lens), kv_heads, dim, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def test_reference_kernel_computes_the_contract_with_fewer_queries_than_keys_and_gqa():
    q_lens, k_lens = [5, 2, 3, 1, 7], [5, 9, 3, 6, 7]  # equal, fewer queries (shared prompt), one query
    q, k, v, cu_q, cu_k = random_segments(q_lens, k_lens)
    for scale in (None, 0.3):
        got = reference_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), scale)
        torch.testing.assert_close(got, contract_by_loop(q, k, v, cu_q, cu_k, scale), atol=1e-6, rtol=0)


def test_causal_mask_is_aligned_to_the_bottom_right():
    """flash-attn's documented example: seqlen_q = 2, seqlen_k = 5 keeps [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]].
    With equal queries (uniform attention) and one-hot values the output is that mask, row-normalised."""
    q = torch.zeros(2, 1, 5)
    k = torch.zeros(5, 1, 5)
    v = torch.eye(5)[:, None, :]
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    got = reference_varlen(q, k, v, cu_q, cu_k, 2, 5)[:, 0]
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(got, keep / keep.sum(-1, keepdim=True))


def test_prefix_sharing_layout_gives_each_response_the_prompt_and_its_own_keys():
    """One example, prompt of 3, responses of 2 and 1: segments prompt (3 q / 3 k), response 0 (2 q over
    [prompt ; response 0] = 5 k), response 1 (1 q over 4 k); queries are the row's tokens in order."""
    from sempa_dist.data.tokenize import TokenizedExample

    ex = TokenizedExample([5, 6, 7], [[8, 9], [10]], 0)
    lay = VarlenLayout.of(build_batch([ex, ex], "packed", prefix_sharing=True))
    assert lay.cu_q.tolist() == [0, 3, 5, 6, 9, 11, 12]
    assert lay.cu_k.tolist() == [0, 3, 8, 12, 15, 20, 24]
    assert (lay.max_q, lay.max_k) == (3, 5)
    assert lay.q_index is None  # one packed row: every token is a query, in order
    assert lay.kv_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 6, 7, 8, 9, 10, 6, 7, 8, 11]
    plain = VarlenLayout.of(build_batch([ex], "packed"))
    assert plain.cu_q.tolist() == plain.cu_k.tolist() == [0, 5, 9] and plain.kv_index is None
    padded = VarlenLayout.of(build_batch([ex], "padded"))  # rows [5 tokens] and [4 + 1 padding]
    assert padded.q_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("impl", ["sdpa_varlen", "sdpa", "eager"])
def test_prefix_sharing_equals_separate_sequences_values_and_gradients(arch, k, impl):
    """Prompt encoded once for its 1 + K responses == each prompt + response run alone (fp32, 1e-5), for
    per-response log-probs, their gradients, and the preference loss built on them. Under sdpa_varlen
    this is the varlen contract with gathered prompt keys: the GPU kernels' path, on the reference kernel."""
    from sempa_dist.loss import preference_loss

    model = tiny_model(arch, impl).train()
    scorer = SequenceScorer(model, impl, chunk_tokens=8)
    exs = random_examples(5, k=k, seed=11, prompt_range=(2, 30), response_range=(1, 12))
    weights = torch.randn(len(exs) * (k + 1))

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return out

    shared_sums = scorer(build_batch(exs, "packed", prefix_sharing=True)).sums
    (shared_sums * weights).sum().backward()
    shared_grads = grads()
    separate = []
    for e, ex in enumerate(exs):  # each sequence in a forward and backward of its own, gradients summed
        for r in range(k + 1):
            s = scorer(build_batch([alone(ex, r)], "packed")).sums[0]
            (s * weights[e * (k + 1) + r]).backward()
            separate.append(s.detach())
    separate_sums, separate_grads = torch.stack(separate), grads()
    torch.testing.assert_close(shared_sums.detach(), separate_sums, atol=1e-5, rtol=0)
    for name in separate_grads:
        g = separate_grads[name]
        torch.testing.assert_close(shared_grads[name], g, atol=1e-5 * max(1.0, g.abs().max().item()), rtol=1e-4, msg=name)
    ref = separate_sums - 0.5
    loss_shared, _ = preference_loss(shared_sums.detach().view(-1, k + 1), ref.view(-1, k + 1), 0.1, "plackett_luce")
    loss_separate, _ = preference_loss(separate_sums.view(-1, k + 1), ref.view(-1, k + 1), 0.1, "plackett_luce")
    torch.testing.assert_close(loss_shared, loss_separate, atol=1e-6, rtol=0)
    with torch.no_grad():
        padded_shared = scorer(build_batch(exs, "padded", prefix_sharing=True)).sums
    torch.testing.assert_close(padded_shared, separate_sums, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# The GPU kernels' adapters, against stand-ins with their documented signatures (no GPU here: the
# kernels themselves are checked by bench/gpu_check.py on one)


def contract_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, causal=True):
    """The contract (via the reference kernel, expanding nothing itself: it requires equal heads when
    asked to check, see the stand-ins)."""
    assert causal
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def scored_equals_separate(impl: str):
    model = tiny_model("qwen2", impl)  # grouped-query heads (4 q, 2 kv) and biases on q/k/v
    scorer = SequenceScorer(model, impl, chunk_tokens=8)
    exs = random_examples(4, k=2, seed=21, prompt_range=(2, 20), response_range=(1, 9))
    with torch.no_grad():
        shared = scorer(build_batch(exs, "packed", prefix_sharing=True)).sums
        plain = scorer(build_batch(exs, "packed")).sums
        sdpa = SequenceScorer(tiny_model("qwen2", "sdpa"), "sdpa", 8)
        separate = torch.stack([sdpa(build_batch([alone(ex, r)], "packed")).sums[0] for ex in exs for r in range(3)])
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, separate, atol=1e-5, rtol=0)


def test_flash_attn_adapter_calls_flash_attn_varlen_func_positionally_as_documented(monkeypatch):
    """flash-attn 2: flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p=0.0, softmax_scale=None, causal=False, ...); GQA native. A model under fa2_varlen, its
    kernel replaced by a stand-in with that signature, scores as separate runs do."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        assert cu_seqlens_q.dtype == torch.int32 and isinstance(max_seqlen_q, int) and dropout_p == 0.0
        calls.append(causal)
        return contract_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    scored_equals_separate("fa2_varlen")
    assert calls and all(calls)


@pytest.mark.parametrize("api", ["2.10", "2.12"])
def test_torch_varlen_adapter_follows_each_releases_keywords(monkeypatch, api):
    """torch 2.10's varlen_attn takes is_causal and no scale or GQA; 2.12+ take window_size ((-1, 0) =
    causal), scale and enable_gqa. Stand-ins with exactly those signatures, as torch checks them."""
    import torch.nn.attention.varlen as varlen

    seen = []
    if api == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert query.shape[1] == key.shape[1], "2.10 has no GQA: heads must be expanded by the caller"
            seen.append(is_causal)
            return contract_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None, is_causal)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            assert enable_gqa == (query.shape[1] != key.shape[1])
            seen.append(tuple(window_size) == (-1, 0))
            return contract_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, seen[-1])

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    scored_equals_separate("torch_varlen")
    assert seen and all(seen)


# ----------------------------------------------------------------------------------------------
# Which kernel runs where


def test_auto_is_sdpa_varlen_on_cpu_and_never_a_flash_kernel_in_fp32():
    assert resolve_attn_implementation("auto", "cpu", torch.float32) == "sdpa_varlen"
    assert resolve_attn_implementation("auto", "cpu", torch.bfloat16) == "sdpa_varlen"
    for device in ("cpu", "cuda"):  # whatever this machine has: fp32 never gets a flash kernel
        assert not {"fa2_varlen", "torch_varlen"} & set(usable_implementations(device, torch.float32))
    for impl, why in (("fa2_varlen", "needs a CUDA GPU"), ("torch_varlen", "needs a CUDA GPU")):
        with pytest.raises(RuntimeError, match=f"model.attn_implementation={impl}: {why}"):
            resolve_attn_implementation(impl, "cpu", torch.bfloat16)


def test_flash_kernel_with_fp32_is_a_config_error_naming_both_keys():
    from sempa_dist.config import ConfigError, load_config

    for impl in ("fa2_varlen", "torch_varlen"):
        with pytest.raises(ConfigError, match=f"model.attn_implementation: {impl} takes bf16/fp16 only, and model.dtype is fp32"):
            load_config(None, [f"model.attn_implementation={impl}", "model.dtype=fp32"]).validate()
        load_config(None, [f"model.attn_implementation={impl}", "model.dtype=bf16"]).validate()


def test_a_flash_attn_build_that_does_not_import_counts_as_absent(monkeypatch):
    """A wheel built for another torch is found by find_spec but fails to import (undefined symbol)."""
    import builtins

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    attention.flash_attn_importable.cache_clear()
    try:
        assert attention.flash_attn_importable() is False
    finally:
        attention.flash_attn_importable.cache_clear()


def test_scorer_switches_a_model_loaded_with_another_kernel():
    """A model loaded with the default sdpa and scored under sdpa_varlen on a prefix-shared batch: the
    scorer runs the model under its own kernel (else every second response's log-prob came out up to
    0.7 % off, silently)."""
    model = tiny_model("llama", "sdpa")
    exs = random_examples(4, k=1, seed=31)
    with torch.no_grad():
        shared = SequenceScorer(model, "sdpa_varlen", 16)(build_batch(exs, "packed", prefix_sharing=True)).sums
        separate = torch.stack([SequenceScorer(model, "sdpa", 16)(build_batch([alone(ex, r)], "packed")).sums[0]
                                for ex in exs for r in range(2)])
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # the last scorer's


# ----------------------------------------------------------------------------------------------
# flex attention and the row masks


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
def test_flex_block_mask_with_prefix_sharing_equals_separate_sequences(arch, k):
    """flex_varlen's BlockMask computes what each prompt + response computes alone. Values only: torch
    2.13 has no flex backward on CPU; the gradient is flex's own on a GPU, the mask is what is ours."""
    model = tiny_model(arch, "flex_varlen")
    scorer = SequenceScorer(model, "flex_varlen", chunk_tokens=8)
    exs = random_examples(5, k=k, seed=11, prompt_range=(2, 30), response_range=(1, 12))
    with torch.no_grad():
        shared = scorer(build_batch(exs, "packed", prefix_sharing=True)).sums
        padded_shared = scorer(build_batch(exs, "padded", prefix_sharing=True)).sums
        separate = torch.stack([scorer(build_batch([type(ex)(ex.prompt_ids, [r], 0)], "packed")).sums[0]
                                for ex in exs for r in ex.responses])
    torch.testing.assert_close(shared, separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_shared, separate, atol=1e-5, rtol=0)
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
        assert resolve_attn_implementation("flex_varlen", "cpu", torch.float32) == "flex_varlen"
    else:
        with pytest.raises(RuntimeError, match="cannot train through flex attention on cpu"):
            resolve_attn_implementation("flex_varlen", "cpu", torch.float32)


def test_flex_unfused_warning_is_muted_on_cpu_only_for_its_own_call():
    """CPU flex passes are unfused on purpose: no warning from them. The filter must not outlive the call:
    on a GPU the same warning would reveal a fall back to unfused flex."""
    model = tiny_model("llama", "flex_varlen")
    batch = build_batch(random_examples(2, k=1, seed=3), "packed", prefix_sharing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            SequenceScorer(model, "flex_varlen", 8)(batch)
        warnings.warn("flex_attention called without torch.compile() - this will use an unfused implementation",
                      UserWarning, stacklevel=1)
    flex = [w for w in caught if "flex_attention called without torch.compile" in str(w.message)]
    assert len(flex) == 1  # only the one issued outside the CPU call


def test_prefix_sharing_row_mask_hides_siblings():
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


@pytest.mark.parametrize("sharing", [False, True])
def test_sdpa_varlen_attends_per_segment_without_a_row_by_row_mask(sharing):
    """The point of the varlen layout: attention costs sum(q_len x k_len), not row^2; and outside a
    packed forward (no layout: STS encoding with a padding mask) sdpa_varlen is exactly sdpa."""
    exs = random_examples(6, k=2, seed=5, prompt_range=(2, 20), response_range=(1, 8))
    batch = build_batch(exs, "packed", prefix_sharing=sharing)
    kw = attention_inputs(batch, "sdpa_varlen")
    assert kw["attention_mask"].shape == (1, 1, 1, 1)  # a placeholder: no [row, row] mask is built
    lay = kw["varlen"]
    q_lens, k_lens = (lay.cu_q[1:] - lay.cu_q[:-1]).tolist(), (lay.cu_k[1:] - lay.cu_k[:-1]).tolist()
    assert sum(q_lens) == batch.real_tokens
    assert len(q_lens) == (len(exs) * 4 if sharing else len(exs) * 3)  # prompt + 3 responses, or 3 sequences
    pairs = sum(q * k for q, k in zip(q_lens, k_lens, strict=True))
    assert pairs < batch.input_ids.numel() ** 2 / 5  # vs the [row, row] mask of sdpa

    ids = torch.randint(1, 90, (3, 11))
    pad = torch.ones_like(ids)
    pad[1, 7:] = 0
    with torch.no_grad():
        a = tiny_model("llama", "sdpa_varlen").model(input_ids=ids, attention_mask=pad).last_hidden_state
        b = tiny_model("llama", "sdpa").model(input_ids=ids, attention_mask=pad).last_hidden_state
    torch.testing.assert_close(a[pad.bool()], b[pad.bool()], atol=1e-6, rtol=0)


def test_reference_kernel_expands_kv_heads_instead_of_sdpa_enable_gqa(monkeypatch):
    """SDPA with a mask and enable_gqa falls back to the math kernel on CUDA; the reference kernel hands
    SDPA equal head counts."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v, cu_q, cu_k = random_segments([3, 4], [3, 6], heads=6, kv_heads=2)
    reference_varlen(q, k, v, cu_q, cu_k, 4, 6)
    assert seen == [(6, 6, False)]
