"""Sentence embeddings from a causal LM, PromptEOL style.

Each sentence goes into the embedding prompt (default ``This sentence : "{sentence}" means in one
word:"``) and its embedding is the last layer's hidden state at the prompt's last token (``last``),
or the mean over the prompt's tokens (``mean``). Batches are sorted by length and right-padded:
under causal attention the last real token never sees the padding, so this equals the usual
left-padded batching up to float noise, with almost no padding.

The same code runs on a plain HF model (one process) and on the ZeRO-3 policy engine during
training: sentences are sharded over ranks, every rank runs the same number of forward passes
(ZeRO-3 gathers parameters collectively), and the embeddings are all-gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sempa_dist.config import DEFAULT_EMBED_PROMPT
from sempa_dist.data.tokenize import TokenizedExample
from sempa_dist.packing import PackedBatch, build_batch

HiddenFn = Callable[[PackedBatch], torch.Tensor]


def normalize_sentence(s: str) -> str:
    """PromptEOL/SemPA preprocessing: double quotes become single (one inside the prompt would end
    it), a final '?' becomes '.', and '.' is appended unless the sentence ends in . ? " or '
    (exactly their batcher's rule: 'wow !' becomes 'wow !.')."""
    s = s.strip().replace('"', "'")
    if s.endswith("?"):
        s = s[:-1] + "."
    if s and s[-1] not in ".?\"'":
        s += "."
    return s


class Encoder:
    """`encode(sentences) -> np.ndarray [N, hidden]` (float32), MTEB-style.

    `hidden_fn` maps a PackedBatch to last-layer hidden states [rows, length, hidden]
    (`SequenceScorer.hidden_states`, or the policy engine's module during training).
    """

    def __init__(
        self, hidden_fn: HiddenFn, tokenizer, prompt: str = DEFAULT_EMBED_PROMPT, pooling: str = "last",
        normalize: bool = True, batch_size: int = 64, device: torch.device | str = "cpu",
        show_progress: bool = True, hidden_size: int | None = None,
    ) -> None:
        if "{sentence}" not in prompt:
            raise ValueError(f"embedding prompt must contain '{{sentence}}', got {prompt!r}")
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.hidden_fn, self.tokenizer = hidden_fn, tokenizer
        self.prompt, self.pooling, self.normalize = prompt, pooling, normalize
        self.batch_size, self.device, self.show_progress = batch_size, torch.device(device), show_progress
        self.hidden_size = hidden_size  # only needed to shape the result of encoding nothing

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, attn_implementation: str = "sdpa", **kw) -> Encoder:
        """Load a registered name, HF directory or hub id (fp32, eval mode) on one process."""
        from sempa_dist.logprobs import SequenceScorer
        from sempa_dist.models import load_model, load_tokenizer

        model = load_model(name_or_path, attn_implementation)
        scorer = SequenceScorer(model, attn_implementation, chunk_tokens=1024)
        kw.setdefault("hidden_size", model.config.hidden_size)
        return cls(scorer.hidden_states, load_tokenizer(str(name_or_path)), **kw)

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        texts = [self.prompt.replace("{sentence}", normalize_sentence(s) if self.normalize else s) for s in sentences]
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def _pool(self, ids: list[list[int]]) -> torch.Tensor:
        batch = build_batch([TokenizedExample(x, [[]], i) for i, x in enumerate(ids)], "padded",
                            self.tokenizer.pad_token_id or 0).to(self.device)
        hidden = self.hidden_fn(batch).float()
        lens = torch.tensor([lens[0] for lens in batch.seq_lens], device=hidden.device)
        if self.pooling == "last":
            return hidden[torch.arange(len(ids), device=hidden.device), lens - 1]
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lens[:, None]
        return (hidden * keep[..., None]).sum(1) / lens[:, None]

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embeddings of `sentences` in order. Collective when torch.distributed is initialised
        with several ranks: every rank must call it with the same sentences."""
        if not sentences:  # every rank sees the same (empty) list: no collective to line up
            return np.zeros((0, self.hidden_size or 0), dtype=np.float32)
        bs = batch_size or self.batch_size
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        ids = self.tokenize(sentences)
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))  # similar lengths share a batch
        mine = order[rank::world]
        per_rank = math.ceil(len(ids) / world)
        steps = math.ceil(per_rank / bs)
        from tqdm import tqdm

        parts = []
        for b in tqdm(range(steps), desc="encode", disable=not self.show_progress or rank != 0, leave=False):
            chunk = mine[b * bs : (b + 1) * bs]
            # a rank out of sentences still runs a forward: its peers' parameter gathers need it
            pooled = self._pool([ids[i] for i in chunk] if chunk else [ids[order[0]]])
            parts.append(pooled[: len(chunk)].cpu())
        hidden = parts[0].shape[1] if parts else 0
        local = torch.cat(parts) if parts else torch.zeros(0, hidden)
        if world == 1:
            gathered, shards = [local], [mine]
        else:
            padded = torch.zeros(per_rank, local.shape[1])
            padded[: len(local)] = local
            padded = padded.to(self.device)
            gathered = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded)
            shards = [order[r::world] for r in range(world)]
        out = np.zeros((len(ids), local.shape[1]), dtype=np.float32)
        for shard, emb in zip(shards, gathered, strict=True):
            out[shard] = emb[: len(shard)].cpu().numpy()
        return out
