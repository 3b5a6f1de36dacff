"""Attention that keeps packed sequences apart: one varlen contract, several kernels.

The contract (what every varlen kernel computes):

    varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> out
    q [total_q, heads, dim], k and v [total_k, kv_heads, dim] (grouped-query heads allowed),
    segment i's queries are q[cu_q[i]:cu_q[i+1]], its keys k[cu_k[i]:cu_k[i+1]]; causal, with the
    mask aligned to the BOTTOM RIGHT when a segment has fewer queries than keys (flash-attn's rule,
    since flash-attn 2.1): query j of a segment with nq queries and nk keys sees keys 0..j + nk - nq.

Kernels behind it (`model.attn_implementation`):
- ``fa2_varlen``: flash-attn's ``flash_attn_varlen_func`` (GPU, bf16/fp16, the flash-attn package
  when it really imports: a build made for another torch counts as absent). Not "flash_...": transformers
  takes any implementation name containing "flash" for its own flash-attention integration;
- ``torch_varlen``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA,
  bf16/fp16): FlashAttention without building the flash-attn package;
- ``sdpa_varlen``: the reference kernel, exactly the contract on any device: each segment gathered
  into a padded slot [segments, longest, heads, dim] and attended with SDPA under its own bottom-right
  causal mask (K/V heads expanded, as SDPA with a mask and ``enable_gqa`` falls back to its math
  kernel on CUDA). Cost O(sum of segment^2), not O(row^2).

Everything above the kernel is the same code on every device (``VarlenLayout``): which tokens are a
segment's queries and keys, and, with prefix sharing, the key gathering. A prefix-shared example is
one run of tokens ``prompt | response_0 | ... | response_K`` (position ids continue from the prompt
for every response; packing.py). Under the varlen contract it becomes 2 + K segments: the prompt
(queries = keys = prompt tokens), then each response, whose queries are its own tokens and whose keys
are ``[prompt ; response]``: the prompt's keys and values are gathered once per response (a copy of
K/V per layer, not a second pass through the layers), and bottom-right alignment then gives exactly
the sibling rule (a response sees the prompt and its own earlier tokens, never a sibling).

Other implementations, for comparison and for passes without a varlen kernel:
- ``flex_varlen``: flex attention with a BlockMask built once per batch from the sibling rule (same
  segment, causal, a key is a prompt token or in the query's own response); fully masked 128x128
  tiles are skipped. Compiled on a GPU. torch 2.13 has no flex backward on CPU, so there it only
  serves passes without gradients; training with it on CPU is refused up front.
- ``sdpa``/``eager``: one [row, row] 4-D mask (bool for sdpa, additive float for eager). Position ids
  restarting per segment alone do NOT isolate segments under these kernels (measured: logits differ
  by up to 0.78 without the mask); the mask matches separate runs to ~1e-7 in fp32.
- padded rows without sharing: the usual 2-D padding mask.
Outside a packed forward (STS encoding, generation: no ``varlen`` / ``block_mask`` argument) every
name registered here is plain sdpa.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sempa_dist.packing import PackedBatch

FA2_VARLEN = "fa2_varlen"
TORCH_VARLEN = "torch_varlen"
SDPA_VARLEN = "sdpa_varlen"
FLEX_VARLEN = "flex_varlen"
VARLEN_KERNELS = (FA2_VARLEN, TORCH_VARLEN, SDPA_VARLEN)
FLASH_KERNELS = (FA2_VARLEN, TORCH_VARLEN)  # fp16/bf16 only, CUDA only
IMPLEMENTATIONS = (*VARLEN_KERNELS, FLEX_VARLEN, "sdpa", "eager")

VarlenKernel = Callable[..., torch.Tensor]  # (q, k, v, cu_q, cu_k, max_q, max_k, scale) -> out


# ----------------------------------------------------------------------------------------------
# The kernels


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, scale: float | None = None) -> torch.Tensor:
    """The varlen contract computed with SDPA, one padded slot per segment (any device, any dtype)."""
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
    rows_q = torch.arange(max_q, device=q.device)
    rows_k = torch.arange(max_k, device=q.device)
    valid_q = rows_q[None, :] < lens_q[:, None]  # [S, max_q]
    valid_k = rows_k[None, :] < lens_k[:, None]  # [S, max_k]
    index_q = torch.where(valid_q, cu_q[:-1, None].long() + rows_q[None, :], 0)
    index_k = torch.where(valid_k, cu_k[:-1, None].long() + rows_k[None, :], 0)
    groups = q.shape[1] // k.shape[1]
    # [S, slot, heads, dim] -> [S, heads, slot, dim]; K/V heads expanded for grouped-query attention
    qs = q[index_q].transpose(1, 2)
    ks = k[index_k].repeat_interleave(groups, dim=2).transpose(1, 2)
    vs = v[index_k].repeat_interleave(groups, dim=2).transpose(1, 2)
    # bottom-right causal: query j sees key i when i <= j + (nk - nq)
    offset = (lens_k - lens_q)[:, None, None]
    mask = valid_k[:, None, :] & (rows_k[None, None, :] <= rows_q[None, :, None] + offset)
    mask |= ~valid_q[:, :, None] & (rows_k == 0)[None, None, :]  # padding queries: a finite softmax
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)[valid_q]  # [total_q, heads, dim] in segment order


def _flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None) -> torch.Tensor:
    """flash-attn 2's kernel, called positionally (its names differ from transformers' wrappers'):
    flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
    softmax_scale, causal). Grouped-query heads are native."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, True)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn, whose keywords changed between releases: torch 2.10 takes
    `is_causal`; later releases take `window_size` ((-1, 0) = causal) and, from 2.12, `enable_gqa`.
    Without `enable_gqa` the K/V heads are expanded here."""
    from torch.nn.attention.varlen import varlen_attn

    params = _parameters(varlen_attn)
    kw: dict = {}
    if "is_causal" in params:
        kw["is_causal"] = True
    else:
        kw["window_size"] = (-1, 0)
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None and scale != q.shape[-1] ** -0.5:
        raise RuntimeError(f"torch {torch.__version__}'s varlen_attn takes no scale; this model needs {scale}")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@functools.cache
def _parameters(fn: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


KERNELS: dict[str, VarlenKernel] = {FA2_VARLEN: _flash_attn_varlen, TORCH_VARLEN: _torch_varlen,
                                    SDPA_VARLEN: reference_varlen}


# ----------------------------------------------------------------------------------------------
# What this machine can run


@functools.cache
def flash_attn_importable() -> bool:
    """flash-attn really imports (a wheel built for another torch fails here with an undefined
    symbol, where `find_spec` would still find it)."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # ImportError, OSError (missing .so), RuntimeError (CUDA/ABI mismatch)
        return False
    return True


@functools.cache
def torch_varlen_importable() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(q, q, q).sum().backward()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def unusable_reason(impl: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why `impl` cannot train here (what is missing, to follow the kernel's name), or None when it can."""
    if impl in FLASH_KERNELS:
        if device_type != "cuda" or not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"takes bf16/fp16 only, and the model runs in {str(dtype).removeprefix('torch.')} (model.dtype)"
        if impl == FA2_VARLEN and not flash_attn_importable():
            return "needs the flash-attn package, built for this torch (pip install 'sempa-dist[gpu]')"
        if impl == TORCH_VARLEN and not (torch_varlen_importable() and torch.backends.cuda.is_flash_attention_available()):
            return f"needs torch >= 2.10 built with FlashAttention (this is {torch.__version__})"
    if impl == FLEX_VARLEN and not flex_backward_supported(device_type):
        return f"torch {torch.__version__} cannot train through flex attention on {device_type} (no backward there)"
    return None


def usable_implementations(device_type: str, dtype: torch.dtype) -> list[str]:
    """The kernels that can train here, fastest first as far as one can tell without measuring:
    the flash kernels, then flex (compiled), then the reference."""
    order = (FA2_VARLEN, TORCH_VARLEN, FLEX_VARLEN, SDPA_VARLEN)
    return [impl for impl in order if unusable_reason(impl, device_type, dtype) is None]


def resolve_attn_implementation(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """'auto' -> the first usable of usable_implementations (kernel_choice measures instead where it
    may); an explicit kernel must be usable for training here, else RuntimeError naming the key."""
    if requested == "auto":
        return usable_implementations(device_type, dtype)[0]
    why = unusable_reason(requested, device_type, dtype)
    if why:
        raise RuntimeError(f"model.attn_implementation={requested}: {why}; use auto or {SDPA_VARLEN} on this machine")
    return requested


# ----------------------------------------------------------------------------------------------
# Layouts: what each kernel is given


@dataclass(frozen=True)
class VarlenLayout:
    """Where each segment's queries and keys lie in a batch's flattened tokens [rows * length].

    `q_index` lists the query tokens in segment order (None: every token of the single packed row, in
    order); `kv_index` lists each segment's keys (None: the same tokens as the queries)."""

    cu_q: torch.Tensor  # int32 [segments + 1]
    cu_k: torch.Tensor  # int32 [segments + 1]
    max_q: int
    max_k: int
    q_index: torch.Tensor | None  # long [total_q]
    kv_index: torch.Tensor | None  # long [total_k]

    @classmethod
    def of(cls, batch: PackedBatch) -> VarlenLayout:
        """Segments of `batch`: one per sequence; with prefix sharing, per example the prompt and then
        each response with keys [prompt ; response]."""
        length = batch.input_ids.shape[1]
        q_runs: list[tuple[int, int]] = []  # (flat start, length) of each segment's queries
        k_runs: list[list[tuple[int, int]]] = []  # each segment's keys, as runs of flat tokens
        for r, row in enumerate(batch.runs):  # Python lists: no device sync to read the layout
            start = r * length
            for lens in row:
                prompt = (start, lens[0])
                q_runs.append(prompt)
                k_runs.append([prompt])
                pos = start + lens[0]
                for n in lens[1:]:  # prefix sharing: each response over [prompt ; response]
                    q_runs.append((pos, n))
                    k_runs.append([prompt, (pos, n)])
                    pos += n
                start = pos
        q_lens = [n for _, n in q_runs]
        k_lens = [sum(n for _, n in runs) for runs in k_runs]
        device = batch.input_ids.device
        q_index = _runs_index(q_runs)
        # query runs are disjoint and ascending: covering every position means covering them in order
        identity = q_index.numel() == batch.input_ids.numel()
        kv_index = _runs_index([run for runs in k_runs for run in runs])
        same_kv = kv_index.numel() == q_index.numel() and bool((kv_index == q_index).all())
        return cls(
            cu_q=_cumulative(q_lens).to(device), cu_k=_cumulative(k_lens).to(device),
            max_q=max(q_lens), max_k=max(k_lens),
            q_index=None if identity else q_index.to(device),
            kv_index=None if same_kv else kv_index.to(device),
        )


def _runs_index(runs: list[tuple[int, int]]) -> torch.Tensor:
    starts = torch.tensor([s for s, _ in runs], dtype=torch.long)
    lens = torch.tensor([n for _, n in runs], dtype=torch.long)
    offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return torch.repeat_interleave(starts, lens) + offsets


def _cumulative(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return cu


def sibling_visible(query_branch: torch.Tensor, key_branch: torch.Tensor) -> torch.Tensor:
    """Prefix sharing's rule for row masks: a key is visible to a query when it is a prompt token
    (branch 0) or in the query's own response. The one definition, for the row mask and flex."""
    return (key_branch == 0) | (key_branch == query_branch)


def segment_ids(seq_lens: list[list[int]], length: int) -> torch.Tensor:
    """Long [rows, length]: the index of each token's segment within its row; -1 in the padding tail."""
    doc = torch.full((len(seq_lens), length), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        doc[r, : sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return doc


def block_causal_mask(seq_lens: list[list[int]], length: int, branch: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [rows, 1, length, length]: True where query i may attend key j: same segment, j <= i,
    and (with `branch` [rows, length]) the sibling rule."""
    doc = segment_ids(seq_lens, length)
    doc = doc.to(branch.device) if branch is not None else doc
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    mask = same & causal
    if branch is not None:
        mask &= sibling_visible(branch[:, :, None], branch[:, None, :])
    # rows' padding tail (only when rows differ in length) attends to itself, keeping softmax finite
    mask |= torch.eye(length, dtype=torch.bool, device=mask.device)
    return mask[:, None]


def attention_inputs(batch: PackedBatch, impl: str, dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments for the decoder's forward that realise `batch`'s layout under `impl`."""
    kw: dict = {"position_ids": batch.position_ids}
    if impl in (*VARLEN_KERNELS, FLEX_VARLEN):
        # the layout (or block mask) is what these kernels read; a 4-D placeholder mask makes transformers
        # skip building its own [rows, 1, L, L] mask from the restarting position ids (O(L^2), unused)
        kw["attention_mask"] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=batch.input_ids.device)
        if impl == FLEX_VARLEN:
            kw["block_mask"] = row_block_mask(batch)
        else:
            kw["varlen"] = VarlenLayout.of(batch)
        return kw
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"unknown attention implementation {impl!r}; one of {', '.join(IMPLEMENTATIONS)}")
    if batch.layout == "padded" and not batch.prefix_sharing:
        mask = torch.zeros(batch.input_ids.shape, dtype=torch.long, device=batch.input_ids.device)
        for r, lens in enumerate(batch.seq_lens):
            mask[r, : lens[0]] = 1
        kw["attention_mask"] = mask
        return kw
    branch = batch.branch if batch.prefix_sharing else None
    mask = block_causal_mask(batch.seq_lens, batch.input_ids.shape[1], branch).to(batch.input_ids.device)
    if impl == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        mask = additive.masked_fill(~mask, torch.finfo(dtype).min)
    kw["attention_mask"] = mask
    return kw


# ----------------------------------------------------------------------------------------------
# transformers attention functions ([rows, heads, length, dim] in, [rows, length, heads, dim] out)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     varlen: VarlenLayout | None = None, *, kernel: str, **kwargs):
    """The varlen contract inside a transformers model: flatten, gather each segment's queries and
    keys (VarlenLayout), run `kernel`, scatter back. Plain sdpa without a layout."""
    if varlen is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise ValueError(f"{kernel} has no attention dropout; set the model's attention_dropout to 0")
    rows, heads, length, _ = query.shape

    def flat(t: torch.Tensor) -> torch.Tensor:  # [rows, h, length, d] -> [rows * length, h, d]
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[-1])

    q, k, v = flat(query), flat(key), flat(value)
    if varlen.q_index is not None:
        q = q[varlen.q_index]
    kv_index = varlen.kv_index if varlen.kv_index is not None else varlen.q_index
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
    out = KERNELS[kernel](q.contiguous(), k.contiguous(), v.contiguous(), varlen.cu_q, varlen.cu_k,
                          varlen.max_q, varlen.max_k, scaling)
    if varlen.q_index is not None:
        out = out.new_zeros(rows * length, heads, out.shape[-1]).index_put((varlen.q_index,), out)
    return out.view(rows, length, heads, out.shape[-1]), None


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
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda:  # compiled: eager flex materialises every score. Its 'unfused' warning stays audible here.
        out = _compiled_flex()(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    else:  # no-grad passes only (see resolve_attn_implementation); unfused on CPU, known and intended
        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)
            out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


for _name in VARLEN_KERNELS:
    AttentionInterface.register(_name, functools.partial(varlen_attention, kernel=_name))
AttentionInterface.register(FLEX_VARLEN, flex_varlen_attention)
for _name in (*VARLEN_KERNELS, FLEX_VARLEN):  # the masks sdpa gets when no layout / block mask is given
    AttentionMaskInterface.register(_name, sdpa_mask)
