"""Per-sequence log-probs of response tokens, without ever holding [tokens, vocab] logits.

Only positions whose next token is a response token are scored (a SemPA sequence is mostly
prompt, so this alone skips most of the LM-head work). Those positions go through the LM head in
chunks of ``chunk_tokens``, so at most one chunk's [chunk, vocab] logits exist at a time: a frozen
head takes each chunk's input gradient in forward; a trainable head recomputes all chunks but the
last in backward. The LM head is called as a module, so under ZeRO-3 its partitioned weight is
gathered by DeepSpeed's hooks in forward and recompute.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sempa_dist.attention import attention_inputs
from sempa_dist.packing import PackedBatch

_BLOCK_ELEMENTS = 1 << 22  # fp32 elements per block of rows (16 MB): a block's passes run in cache


def _logprobs_and_softmax_(buf: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids_i) under fp32 logits `buf` [n, vocab], turning `buf` into softmax(buf) IN PLACE, a
    cache-sized block of rows at a time. The softmax is all the gradient needs (d lp / d logits =
    onehot - softmax), and no second [n, vocab] tensor is made (torch.logsumexp allocates one).
    Measured on CPU at vocab 49k: blocks make the pass 3x faster than one call over 1024 rows."""
    lp = buf.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, buf.shape[-1]))
    for block, block_lp in zip(buf.split(rows), lp.split(rows), strict=True):
        top = block.amax(-1, keepdim=True)
        total = block.sub_(top).exp_().sum(-1, keepdim=True)
        block.div_(total)
        block_lp.sub_((top + total.log()).squeeze(-1))  # - logsumexp
    return lp


def _logprob_grad_(probs: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """d (scale_i * lp_i) / d logits_i = scale_i * (onehot(ids_i) - softmax_i), built IN PLACE in `probs`
    (the softmax from _logprobs_and_softmax_, consumed)."""
    rows = torch.arange(probs.shape[0], device=probs.device)
    if scale is None:
        probs.neg_()
        probs[rows, ids] += 1
    else:
        probs.mul_(-scale.unsqueeze(-1))
        probs[rows, ids] += scale
    return probs


class _LogprobsOfLogits(torch.autograd.Function):
    """lp_i = log softmax(logits_i)[ids_i], keeping only the softmax, made in the logits' own buffer, for
    backward (autograd through gather and logsumexp keeps the logits and makes three to four more
    [chunk, vocab] tensors). The logits are overwritten: nothing else reads them (the LM head's linear
    saved its input and weight, not its output). Backward consumes the softmax, so a graph through it
    is good for one backward, as under the per-chunk checkpoint, which recomputes it for that one."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        probs = logits.float()  # in fp32 the logits' own storage
        lp = _logprobs_and_softmax_(probs, ids)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(probs, ids)
        return lp

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, ids = ctx.saved_tensors
        return _logprob_grad_(probs, ids, grad).to(ctx.logits_dtype), None


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _LogprobsOfLogits.apply(head(hidden), ids)


def _frozen_head_chunk(head: nn.Module, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One chunk through a frozen head, with d logp / d hidden taken right away (one backward
    matmul, as full logits would need) so nothing of [chunk, vocab] survives the chunk. The result
    carries that gradient by linearisation: lp + <h - sg(h), g> has value lp and gradient g."""
    with torch.enable_grad():
        leaf = h.detach().requires_grad_(True)
        logits = head(leaf)  # the module call: ZeRO-3 gathers the weight here and in its backward
        with torch.no_grad():
            # fp32: the logits' own storage (the linear layer saved its input and weight, not its output)
            probs = logits.detach().float()
            lp = _logprobs_and_softmax_(probs, ids)
            dlogits = _logprob_grad_(probs, ids)
        (g,) = torch.autograd.grad(logits, leaf, grad_outputs=dlogits.to(logits.dtype))
    return lp + ((h - h.detach()) * g).sum(-1).float()


def chunked_token_logprobs(hidden: torch.Tensor, ids: torch.Tensor, head: nn.Module, chunk_tokens: int,
                           chunks: int | None = None) -> torch.Tensor:
    """log p(ids[i] | hidden[i]) for hidden [N, H], ids [N], in chunks of at most `chunk_tokens` rows.

    `chunks`: split into exactly this many near-equal pieces (empty ones too) instead; it must be at
    least ceil(N / chunk_tokens). Under ZeRO-3 every rank must call the head the same number of times
    (see SequenceScorer). Under autograd: a frozen head (LoRA, the usual SemPA setup) gets its input
    gradient in the forward pass (same FLOPs as full logits, chunk-sized memory); a trainable head
    keeps the LAST chunk's logits for backward and checkpoints the others (one extra head matmul each
    in backward). Backward reaches the last chunk first (autograd runs the newest ready node first) and
    consumes its logits in place, so at most one chunk of logits is held at a time; a micro-batch whose
    scored tokens fit one chunk (the usual SemPA case) recomputes nothing."""
    n = hidden.shape[0]
    chunks = math.ceil(n / chunk_tokens) if chunks is None else chunks
    if chunks * chunk_tokens < n:
        raise ValueError(f"{chunks} chunks of at most {chunk_tokens} tokens cannot hold {n} tokens")
    if chunks == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    parts = []
    grad = torch.is_grad_enabled() and hidden.requires_grad
    frozen = not any(p.requires_grad for p in head.parameters())
    pieces = zip(torch.tensor_split(hidden, chunks), torch.tensor_split(ids, chunks), strict=True)
    for i, (h, t) in enumerate(pieces):
        if grad and frozen:
            parts.append(_frozen_head_chunk(head, h, t))
        elif grad and i < chunks - 1:
            parts.append(checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h, t))
    return torch.cat(parts)


def sequence_logprobs(
    hidden: torch.Tensor, batch: PackedBatch, head: nn.Module, chunk_tokens: int, chunks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs and response-token count per sequence: ([S], [S]).
    The same routine serves every layout: the batch's scoring map says which hidden state
    predicts which token (with prefix sharing one prompt position predicts several)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    token_lp = chunked_token_logprobs(flat[batch.score_pos], batch.score_ids, head, chunk_tokens, chunks)
    n = batch.num_sequences
    sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, batch.score_seq, token_lp)
    counts = torch.bincount(batch.score_seq, minlength=n)
    return sums, counts


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class Scores(NamedTuple):
    sums: torch.Tensor  # [S] summed response-token log-probs per sequence
    counts: torch.Tensor  # [S] response tokens per sequence
    anchor: torch.Tensor  # scalar 0 that depends on every parameter used (see SequenceScorer.forward)


class SequenceScorer(nn.Module):
    """Wraps a causal LM so that ONE forward (the one DeepSpeed sees) returns per-sequence log-probs.

    Keeping decoder + chunked LM head inside a single root forward lets ZeRO-3's parameter
    hooks see the whole computation, including the LM-head recompute in backward.
    """

    def __init__(self, model: nn.Module, attn_implementation: str, chunk_tokens: int, lockstep: bool = False):
        super().__init__()
        self.model = model
        self.attn_implementation = attn_implementation
        self.chunk_tokens = chunk_tokens
        # inside a ZeRO-3 engine of several ranks: every rank must call every module the same number of
        # times per forward. DeepSpeed records the order of module calls and checks it across ranks with
        # a collective; a rank whose micro-batch needs one more LM-head chunk would wait forever
        # (measured: a hang until the collective timeout). So ranks agree on the chunk count first.
        self.lockstep = lockstep

    def head_chunks(self, scored: int, device: torch.device) -> int:
        """LM-head chunks for `scored` positions (at least 1), agreed as the maximum over ranks in lockstep."""
        chunks = max(1, math.ceil(scored / self.chunk_tokens))
        if self.lockstep and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor([chunks], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            chunks = int(t.item())
        return chunks

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        lm = unwrap_causal_lm(self.model)
        kw = attention_inputs(batch, self.attn_implementation, dtype=next(lm.parameters()).dtype)
        return lm.get_decoder()(input_ids=batch.input_ids, use_cache=False, **kw).last_hidden_state

    def forward(self, batch: PackedBatch, disable_adapter: bool = False) -> Scores:
        """Per-sequence log-probs. `anchor` is an exact zero wired to the decoder and the LM head:
        adding it to the loss makes a dummy (empty) micro-batch produce gradients for every
        parameter, as its peers' do, which ZeRO-3's per-parameter reduction hooks require."""
        ctx = contextlib.nullcontext()
        if disable_adapter:
            if not hasattr(self.model, "disable_adapter"):
                raise RuntimeError("disable_adapter=True needs a peft (LoRA) model")
            ctx = self.model.disable_adapter()
        with ctx:
            hidden = self.hidden_states(batch)
            head = unwrap_causal_lm(self.model).get_output_embeddings()
            chunks = self.head_chunks(batch.score_pos.numel(), hidden.device)
            if batch.num_sequences == 0:  # a dummy micro-batch: its one token through the head, in `chunks` calls
                first = chunked_token_logprobs(hidden[0, :1], batch.input_ids[0, :1], head, self.chunk_tokens, chunks)
                empty = hidden.new_zeros(0, dtype=torch.float32)
                return Scores(empty, torch.zeros(0, dtype=torch.long, device=hidden.device), first.sum() * 0.0)
            sums, counts = sequence_logprobs(hidden, batch, head, self.chunk_tokens, chunks)
            return Scores(sums, counts, sums.sum() * 0.0)
