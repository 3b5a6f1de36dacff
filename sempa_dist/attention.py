"""Attention inputs that keep packed sequences apart.

- GPU with flash-attn: transformers' ``flash_attention_2`` varlen path. Sequence boundaries go in
  as ``cu_seq_lens_q/k`` (the same offsets position_ids restarts imply), so no token attends
  across a boundary and no mask is materialised.
- Everywhere else (``sdpa``/``eager``): position_ids restarts alone do NOT isolate sequences
  under these kernels (measured: logits differ by up to 0.78), so a 4-D block-diagonal causal
  mask is passed: bool for sdpa, additive float for eager. It matches separate runs to ~1e-7.
- Padded rows: the usual 2-D padding mask.
- Prefix sharing (one segment = prompt + all its responses): the 4-D mask also hides sibling
  responses from each other (a key is visible when it is a prompt token or in the query's own
  response). flash-attn varlen cannot express that, so sharing is off under flash_attention_2.
"""

from __future__ import annotations

import importlib.util

import torch

from sempa_dist.packing import PackedBatch


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str) -> str:
    """'auto' -> flash_attention_2 when usable, else sdpa. An explicit flash request must be usable."""
    if requested == "auto":
        return "flash_attention_2" if flash_attn_available() else "sdpa"
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install 'sempa-dist[gpu]'); use auto or sdpa on this machine"
        )
    return requested


def block_causal_mask(seq_lens: list[list[int]], length: int, branch: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [rows, 1, length, length]: True where query i may attend key j: same segment, j <= i,
    and (with `branch` [rows, length]) key j is a prompt token (0) or in query i's own branch."""
    doc = torch.full((len(seq_lens), length), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        doc[r, : sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    doc = doc.to(branch.device) if branch is not None else doc
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    mask = same & causal
    if branch is not None:
        mask &= (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    # rows' padding tail (only when rows differ in length) attends to itself, keeping softmax finite
    mask |= torch.eye(length, dtype=torch.bool, device=mask.device)
    return mask[:, None]


def attention_inputs(batch: PackedBatch, impl: str, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments for the decoder's forward that realise `batch`'s layout under `impl`."""
    kw: dict = {"position_ids": batch.position_ids}
    length = batch.input_ids.shape[1]
    if batch.prefix_sharing and impl == "flash_attention_2":
        raise ValueError("prefix sharing needs a 4-D mask (sdpa/eager); flash-attn varlen cannot hide sibling responses")
    if batch.layout == "padded" and not batch.prefix_sharing:
        mask = torch.zeros(batch.input_ids.shape, dtype=torch.long, device=batch.input_ids.device)
        for r, lens in enumerate(batch.seq_lens):
            mask[r, : lens[0]] = 1
        kw["attention_mask"] = mask
        return kw
    if impl == "flash_attention_2":
        cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
        longest = max(max(lens) for lens in batch.seq_lens)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return kw
    branch = batch.branch if batch.prefix_sharing else None
    mask = block_causal_mask(batch.seq_lens, length, branch).to(batch.input_ids.device)
    if impl == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        mask = additive.masked_fill(~mask, torch.finfo(dtype).min)
    kw["attention_mask"] = mask
    return kw
