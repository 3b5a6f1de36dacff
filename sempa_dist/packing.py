"""Packing preference examples into micro-batches.

An example is a prompt with 1 + K responses (chosen first). Each response becomes its own
sequence ``prompt + response``. A micro-batch is either

- ``packed``: ONE row holding many sequences back to back, no padding; position_ids restart at
  every sequence and the attention layer keeps sequences apart (see attention.py), or
- ``padded``: one row per sequence, right-padded to the longest (the conventional baseline).

Both layouts carry the same scoring map: at every row position, the id of the NEXT token
(``target_ids``) and the sequence it belongs to (``target_seq``, -1 when that next token is not a
response token). Sequences are numbered example-major: sequence ``e * (1 + K) + r`` is response
``r`` of example ``e``, so per-sequence log-probs reshape to ``[examples, 1 + K]``.

Planning (which examples go into which micro-batch on which rank) is separate from rendering.
Every rank runs the same number of micro-steps per optimizer step (ZeRO-3 collectives would hang
otherwise) and the tokens are balanced across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sempa_dist.data.tokenize import TokenizedExample


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    target_ids: torch.Tensor  # [rows, length]: next token (0 where unscored)
    target_seq: torch.Tensor  # [rows, length]: sequence of that next token if it is a response token, else -1
    response_mask: torch.Tensor  # [rows, length] bool: this token is a response token (the loss mask)
    seq_lens: list[list[int]]  # per row, the lengths of its sequences in order (padded rows: [real length])
    cu_seqlens: torch.Tensor  # int32 [sequences + 1]: sequence starts in the flattened packed row(s)
    example_ids: list[int]  # dataset index of each example in this micro-batch
    responses_per_example: int  # 1 + K
    layout: str
    pad_fraction: float

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    @property
    def num_sequences(self) -> int:
        return self.num_examples * self.responses_per_example

    @property
    def real_tokens(self) -> int:
        return sum(sum(r) for r in self.seq_lens)

    @property
    def total_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def _sequences(ex: TokenizedExample) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of each prompt+response sequence of one example."""
    return [(ex.prompt_ids + r, len(ex.prompt_ids)) for r in ex.responses]


def build_batch(examples: Sequence[TokenizedExample], layout: str = "packed", pad_id: int = 0) -> PackedBatch:
    """Render examples into one micro-batch. An empty list gives a 1-token dummy batch with nothing
    scored: a rank with no example left still runs the forward/backward its peers' collectives need."""
    k1 = len(examples[0].responses) if examples else 1
    if any(len(ex.responses) != k1 for ex in examples):
        raise ValueError("all examples of a batch need the same number of responses")
    seqs = [s for ex in examples for s in _sequences(ex)]
    if not seqs:
        seqs = [([pad_id], 1)]
    if layout == "packed":
        rows = [seqs]
    elif layout == "padded":
        rows = [[s] for s in seqs]
    else:
        raise ValueError(f"unknown packing layout {layout!r}")
    length = max(sum(len(ids) for ids, _ in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, length), dtype=torch.long)
    target_ids = torch.zeros((n_rows, length), dtype=torch.long)
    target_seq = torch.full((n_rows, length), -1, dtype=torch.long)
    response_mask = torch.zeros((n_rows, length), dtype=torch.bool)
    seq_lens: list[list[int]] = []
    seq_no = 0
    for r, row in enumerate(rows):
        off = 0
        lens = []
        for ids, plen in row:
            n = len(ids)
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[r, off : off + n] = t
            position_ids[r, off : off + n] = torch.arange(n)
            # position p predicts token p + 1; it is scored when that token is a response token
            target_ids[r, off : off + n - 1] = t[1:]
            if examples:
                target_seq[r, off + plen - 1 : off + n - 1] = seq_no
                response_mask[r, off + plen : off + n] = True
            lens.append(n)
            off += n
            seq_no += 1
        if layout == "padded" and off < length:
            position_ids[r, off:] = torch.arange(off, length)
        seq_lens.append(lens)
    flat_lens = [n for lens in seq_lens for n in lens]
    cu = torch.zeros(len(flat_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(flat_lens, dtype=torch.int32), 0)
    real = sum(flat_lens)
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, target_ids=target_ids, target_seq=target_seq,
        response_mask=response_mask, seq_lens=seq_lens, cu_seqlens=cu,
        example_ids=[ex.index for ex in examples], responses_per_example=k1, layout=layout,
        pad_fraction=1.0 - real / input_ids.numel() if examples else 1.0,
    )


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices by size (first-fit decreasing). Bins keep ascending index order."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if sizes[i] > capacity:
            raise ValueError(f"item {i} has {sizes[i]} tokens, more than the micro-batch budget {capacity}")
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return [sorted(b) for b in bins]


def plan_step(sizes: Sequence[int], world_size: int, capacity: int) -> list[list[list[int]]]:
    """Split one optimizer step's examples (by token size) into ``[rank][micro_step] -> indices``.

    1. Assign examples to ranks, largest first, to the least-loaded rank (balances tokens).
    2. Bin-pack each rank's share into micro-batches of at most ``capacity`` tokens.
    3. Equalise the micro-step count: a rank with fewer bins splits its fullest bins, and only if
       it has fewer examples than steps does it get empty (dummy) micro-batches.
    The plan depends only on the sizes and the world size, so every rank computes it identically.
    """
    load = [0] * world_size
    share: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        share[r].append(i)
        load[r] += sizes[i]
    per_rank = []
    for idx in share:
        bins = first_fit_decreasing([sizes[i] for i in idx], capacity)
        per_rank.append([sorted(idx[j] for j in b) for b in bins])
    steps = max(len(b) for b in per_rank) if per_rank else 0
    for bins in per_rank:
        while len(bins) < steps:
            splittable = [b for b in bins if len(b) > 1]
            if not splittable:
                bins.append([])
                continue
            big = max(splittable, key=lambda b: (sum(sizes[i] for i in b), -b[0]))
            bins.remove(big)
            bins.extend(_split_in_two(big, sizes))
        bins.sort(key=lambda b: b[0] if b else len(sizes))
    return per_rank


def _split_in_two(items: list[int], sizes: Sequence[int]) -> list[list[int]]:
    """Two non-empty halves of about equal tokens (largest first, each to the lighter half)."""
    halves: list[list[int]] = [[], []]
    weight = [0, 0]
    for i in sorted(items, key=lambda i: (-sizes[i], i)):
        h = 0 if weight[0] <= weight[1] else 1
        halves[h].append(i)
        weight[h] += sizes[i]
    return [sorted(h) for h in halves]


def packing_efficiency(sizes: Sequence[int], capacity: int) -> float:
    """Real-token fraction of the rows first-fit-decreasing makes, counting each row at capacity
    (the fixed-shape view that kernels and memory planning see)."""
    bins = first_fit_decreasing(sizes, capacity)
    return sum(sizes) / (len(bins) * capacity)
