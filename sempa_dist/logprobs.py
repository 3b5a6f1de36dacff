"""Per-sequence log-probs of response tokens, without ever holding [tokens, vocab] logits.

Only positions whose next token is a response token are scored (a SemPA sequence is mostly
prompt, so this alone skips most of the LM-head work). Those positions go through the LM head in
chunks of ``chunk_tokens``; under autograd each chunk is checkpointed, so backward recomputes
one chunk's logits at a time instead of keeping them all. The LM head is called as a module, so
under ZeRO-3 its partitioned weight is gathered by DeepSpeed's hooks in forward and recompute.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sempa_dist.attention import attention_inputs
from sempa_dist.packing import PackedBatch


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    # gather - logsumexp: one [chunk, vocab] tensor instead of log_softmax's second one
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _frozen_head_chunk(head: nn.Module, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One chunk through a frozen head, with d logp / d hidden taken right away (one backward
    matmul, as full logits would need) so nothing of [chunk, vocab] survives the chunk. The result
    carries that gradient by linearisation: lp + <h - sg(h), g> has value lp and gradient g.

    d lp_i / d logits_i = onehot(ids_i) - softmax(logits_i), built in place in the logits buffer:
    one [chunk, vocab] allocation per chunk instead of autograd's several."""
    with torch.enable_grad():
        leaf = h.detach().requires_grad_(True)
        logits = head(leaf)  # the module call: ZeRO-3 gathers the weight here and in its backward
        with torch.no_grad():
            # fp32: the logits' own storage (the linear layer saved its input and weight, not its output)
            buf = logits.detach().float()
            rows = torch.arange(buf.shape[0], device=buf.device)
            lse = torch.logsumexp(buf, dim=-1, keepdim=True)
            lp = buf[rows, ids] - lse.squeeze(-1)
            dlogits = buf.sub_(lse).exp_().neg_()  # -softmax, in place
            dlogits[rows, ids] += 1
        (g,) = torch.autograd.grad(logits, leaf, grad_outputs=dlogits.to(logits.dtype))
    return lp + ((h - h.detach()) * g).sum(-1).float()


def chunked_token_logprobs(hidden: torch.Tensor, ids: torch.Tensor, head: nn.Module, chunk_tokens: int) -> torch.Tensor:
    """log p(ids[i] | hidden[i]) for hidden [N, H], ids [N], in chunks of `chunk_tokens` rows.

    Under autograd: a frozen head (LoRA, the usual SemPA setup) gets its input gradient in the
    forward pass (same FLOPs as full logits, chunk-sized memory); a trainable head is checkpointed
    per chunk (one extra head matmul in backward, in exchange for chunk-sized memory)."""
    parts = []
    grad = torch.is_grad_enabled() and hidden.requires_grad
    frozen = not any(p.requires_grad for p in head.parameters())
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], ids[start : start + chunk_tokens]
        if grad and frozen:
            parts.append(_frozen_head_chunk(head, h, t))
        elif grad:
            parts.append(checkpoint(_chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(
    hidden: torch.Tensor, batch: PackedBatch, head: nn.Module, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of response-token log-probs and response-token count per sequence: ([S], [S]).
    The same routine serves every layout: the batch's scoring map says which hidden state
    predicts which token (with prefix sharing one prompt position predicts several)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    token_lp = chunked_token_logprobs(flat[batch.score_pos], batch.score_ids, head, chunk_tokens)
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

    def __init__(self, model: nn.Module, attn_implementation: str, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.attn_implementation = attn_implementation
        self.chunk_tokens = chunk_tokens

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
            sums, counts = sequence_logprobs(hidden, batch, head, self.chunk_tokens)
            if batch.num_sequences == 0:
                first = chunked_token_logprobs(hidden[0, :1], batch.input_ids[0, :1], head, self.chunk_tokens)
                anchor = first.sum() * 0.0
            else:
                anchor = sums.sum() * 0.0
            return Scores(sums, counts, anchor)
