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
- ``sdpa_varlen`` (the default without flash-attn): the torch-native counterpart of the varlen
  kernel. A [row, row] mask makes SDPA score every query against every key of the row, most of
  them masked: O(row^2) for rows of many short segments. Here each segment is gathered into its
  own padded slot, [segments, longest, heads, dim], attended with a per-segment mask (causal, and
  with prefix sharing the sibling rule), and scattered back: O(sum of segment^2). Outside a packed
  forward (STS encoding, generation: no `segments` argument) it is plain sdpa.
- ``flex_varlen``: flex attention with a BlockMask built once per batch from the same rule (same
  segment, causal, sibling rule): fully masked 128x128 tiles are skipped, so sharing costs no more
  than its real attention. Compiled on a GPU. torch 2.13 has no flex-attention backward on CPU, so
  there it only serves passes without gradients (tests check its values against separate runs);
  training on CPU is refused up front. Outside a packed forward it is plain sdpa.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sempa_dist.packing import PackedBatch

SDPA_VARLEN = "sdpa_varlen"
FLEX_VARLEN = "flex_varlen"


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@functools.cache
def flex_backward_supported(device_type: str) -> bool:
    """Whether this torch can train through flex attention on `device_type` (probed once: torch 2.13
    raises NotImplementedError for a CPU backward)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return False
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    q = torch.zeros(1, 1, 16, 16, device=device_type, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def resolve_attn_implementation(requested: str) -> str:
    """'auto' -> flash_attention_2 when usable, else sdpa_varlen (on a GPU, kernel_choice may measure
    instead). An explicit flash or flex request must be usable for training on this machine."""
    if requested == "auto":
        return "flash_attention_2" if flash_attn_available() else SDPA_VARLEN
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install 'sempa-dist[gpu]'); use auto or sdpa on this machine"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == FLEX_VARLEN and not flex_backward_supported(device):
        raise RuntimeError(
            f"model.attn_implementation=flex_varlen: torch {torch.__version__} cannot train through flex attention "
            f"on {device} (no backward there); use auto or sdpa_varlen on this machine"
        )
    return requested


def sibling_visible(query_branch: torch.Tensor, key_branch: torch.Tensor) -> torch.Tensor:
    """Prefix sharing's rule: a key is visible to a query when it is a prompt token (branch 0) or in
    the query's own response. The one definition, for the row mask, sdpa_varlen and flex."""
    return (key_branch == 0) | (key_branch == query_branch)


def sibling_rule(branch: torch.Tensor) -> torch.Tensor:
    """Bool [..., L, L] from branch ids [..., L]: sibling_visible for every (query i, key j)."""
    return sibling_visible(branch[..., :, None], branch[..., None, :])


def segment_ids(seq_lens: list[list[int]], length: int) -> torch.Tensor:
    """Long [rows, length]: the index of each token's segment within its row; -1 in the padding tail."""
    doc = torch.full((len(seq_lens), length), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        doc[r, : sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return doc


def block_causal_mask(seq_lens: list[list[int]], length: int, branch: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [rows, 1, length, length]: True where query i may attend key j: same segment, j <= i,
    and (with `branch` [rows, length]) key j is a prompt token (0) or in query i's own branch."""
    doc = segment_ids(seq_lens, length)
    doc = doc.to(branch.device) if branch is not None else doc
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    mask = same & causal
    if branch is not None:
        mask &= sibling_rule(branch)
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
    if impl == SDPA_VARLEN:
        kw["segments"] = Segments.of(batch)
        return kw
    if impl == FLEX_VARLEN:
        kw["block_mask"] = row_block_mask(batch)
        return kw
    mask = block_causal_mask(batch.seq_lens, length, branch).to(batch.input_ids.device)
    if impl == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        mask = additive.masked_fill(~mask, torch.finfo(dtype).min)
    kw["attention_mask"] = mask
    return kw


@dataclass
class Segments:
    """Where each segment of a batch lies in its flattened rows, and what it may attend to."""

    index: torch.Tensor  # long [segments, longest]: flat token position (row * length + col); 0 in padding
    valid: torch.Tensor  # bool [segments, longest]
    mask: torch.Tensor  # bool [segments, 1, longest, longest]: causal, real keys, the sibling rule

    @classmethod
    def of(cls, batch: PackedBatch) -> Segments:
        length = batch.input_ids.shape[1]
        starts, lens = [], []
        for r, row in enumerate(batch.seq_lens):
            offset = r * length
            for n in row:
                starts.append(offset)
                lens.append(n)
                offset += n
        device = batch.input_ids.device
        longest = max(lens)
        cols = torch.arange(longest, device=device)
        lens_t = torch.tensor(lens, device=device)
        valid = cols[None, :] < lens_t[:, None]
        index = torch.where(valid, torch.tensor(starts, device=device)[:, None] + cols[None, :], 0)
        mask = valid[:, None, :] & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        if batch.prefix_sharing:
            mask &= sibling_rule(batch.branch.reshape(-1)[index])
        mask |= torch.eye(longest, dtype=torch.bool, device=device)  # padding queries: a finite softmax
        return cls(index, valid, mask[:, None])


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, segments: Segments | None = None, **kwargs):
    """transformers attention function ([rows, heads, length, dim] in, [rows, length, heads, dim] out)."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, heads, length, dim = query.shape

    def gather(t: torch.Tensor) -> torch.Tensor:  # [rows, h, length, d] -> [segments, h, longest, d]
        flat = t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[3])
        return flat[segments.index].transpose(1, 2)

    out = F.scaled_dot_product_attention(gather(query), gather(key), gather(value), attn_mask=segments.mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling,
                                         enable_gqa=key.shape[1] != heads)
    out = out.transpose(1, 2)[segments.valid]  # [real tokens, heads, dim]
    flat = out.new_zeros(rows * length, heads, dim).index_put((segments.index[segments.valid],), out)
    return flat.view(rows, length, heads, dim), None


def row_block_mask(batch: PackedBatch):
    """flex attention's BlockMask for `batch`: same segment, causal, and with prefix sharing the sibling
    rule; the padding tail attends to itself only (a finite softmax, as in the other paths)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    doc = segment_ids(batch.seq_lens, length).to(device)
    branch = batch.branch.to(device) if batch.prefix_sharing else torch.zeros_like(doc)

    def mask_mod(b, h, q, kv):
        keep = (doc[b, q] == doc[b, kv]) & (doc[b, q] >= 0) & (kv <= q) & sibling_visible(branch[b, q], branch[b, kv])
        return keep | (q == kv)

    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # automatic dynamic shapes (as transformers does): packed rows vary in length, and a static
    # compile per length would soon hit dynamo's recompile limit and fall back to eager
    return torch.compile(flex_attention)


def flex_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, block_mask=None, **kwargs):
    """transformers attention function over a batch's BlockMask (see row_block_mask); plain sdpa without one."""
    if block_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise ValueError("flex_varlen has no attention dropout; set the model's attention_dropout to 0")
    if query.is_cuda:
        flex = _compiled_flex()  # eager flex materialises every score: compiled is the point on a GPU
    else:  # no-grad passes only (see resolve_attn_implementation); unfused on CPU (its warning is muted below)
        from torch.nn.attention.flex_attention import flex_attention as flex
    out = flex(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


# eager flex on CPU warns on every call that it is unfused: known and intended there (gradient-free passes)
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
AttentionInterface.register(FLEX_VARLEN, flex_varlen_attention)
for _name in (SDPA_VARLEN, FLEX_VARLEN):  # the masks sdpa gets when no segments / block mask are given
    AttentionMaskInterface.register(_name, sdpa_mask)
