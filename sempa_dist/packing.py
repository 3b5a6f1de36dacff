"""Packing preference examples into micro-batches.

An example is a prompt with 1 + K responses (chosen first). It becomes segments of tokens:

- without prefix sharing, one segment ``prompt + response`` per response (the prompt is encoded
  1 + K times);
- with prefix sharing, ONE segment ``prompt | response_0 | ... | response_K``: every response's
  position_ids continue from the prompt's end and the attention mask lets a response see the prompt
  and itself, never a sibling (attention.py). SemPA's sequences are mostly prompt, so this saves
  most of the tokens.

A micro-batch is either ``packed`` (ONE row holding many segments back to back, no padding; the
attention layer keeps segments apart) or ``padded`` (one right-padded row per segment: the
conventional baseline).

Every layout carries the same scoring map, as three aligned lists: the flat row position whose
hidden state predicts a response token (``score_pos``), that token (``score_ids``) and its sequence
(``score_seq``). Sequences are numbered example-major: sequence ``e * (1 + K) + r`` is response
``r`` of example ``e``, so per-sequence log-probs reshape to ``[examples, 1 + K]``.

Planning (which examples go into which micro-batch on which rank) is separate from rendering.
Every rank runs the same number of micro-steps per optimizer step (ZeRO-3 collectives would hang
otherwise) and the tokens are balanced across ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sempa_dist.data.tokenize import TokenizedExample


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    branch: torch.Tensor  # [rows, length]: 0 for prompt tokens; with prefix sharing, r + 1 for response r
    score_pos: torch.Tensor  # [N]: flat position (row * length + col) whose hidden state predicts ...
    score_ids: torch.Tensor  # [N]: ... this response token ...
    score_seq: torch.Tensor  # [N]: ... of this sequence (example-major numbering)
    seq_lens: list[list[int]]  # per row, the lengths of its segments in order (padded rows: [real length])
    runs: list[list[list[int]]]  # per row and segment, its runs: [length], or with prefix sharing [prompt, response 0, ...]
    cu_seqlens: torch.Tensor  # int32 [segments + 1]: segment starts in the flattened packed row(s)
    example_ids: list[int]  # dataset index of each example in this micro-batch
    responses_per_example: int  # 1 + K
    layout: str
    pad_fraction: float
    prefix_sharing: bool = False

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


def example_tokens(ex: TokenizedExample, prefix_sharing: bool) -> int:
    """Tokens an example occupies: the prompt once per response, or once in all with prefix sharing."""
    return len(ex.prompt_ids) + sum(len(r) for r in ex.responses) if prefix_sharing else ex.num_tokens


def _segments(ex: TokenizedExample, first_seq: int, prefix_sharing: bool):
    """Yield (token ids, positions, branches, [(local position, target id, sequence)], run lengths) per segment."""
    p = ex.prompt_ids
    if not prefix_sharing:
        for r, resp in enumerate(ex.responses):
            ids = p + resp
            # position i predicts token i + 1: the last prompt position predicts the first response token
            scores = [(len(p) - 1 + t, tok, first_seq + r) for t, tok in enumerate(resp)]
            yield ids, list(range(len(ids))), [0] * len(ids), scores, [len(ids)]
        return
    ids, pos, branch, scores = list(p), list(range(len(p))), [0] * len(p), []
    for r, resp in enumerate(ex.responses):
        start = len(ids)
        # every response continues the prompt's positions; the last prompt token predicts each first token
        predictors = [len(p) - 1] + list(range(start, start + len(resp) - 1))
        scores += [(at, tok, first_seq + r) for at, tok in zip(predictors, resp, strict=True)]
        ids += resp
        pos += range(len(p), len(p) + len(resp))
        branch += [r + 1] * len(resp)
    yield ids, pos, branch, scores, [len(p), *(len(r) for r in ex.responses)]


def build_batch(
    examples: Sequence[TokenizedExample], layout: str = "packed", pad_id: int = 0, prefix_sharing: bool = False
) -> PackedBatch:
    """Render examples into one micro-batch of segments: one per prompt+response sequence, or with
    `prefix_sharing` one per example (prompt once, then every response; see attention.py for the
    mask that keeps sibling responses apart). An empty list gives a 1-token dummy batch with nothing
    scored: a rank with no example left still runs the forward/backward its peers' collectives need."""
    if layout not in ("packed", "padded"):
        raise ValueError(f"unknown packing layout {layout!r}")
    k1 = len(examples[0].responses) if examples else 1
    if any(len(ex.responses) != k1 for ex in examples):
        raise ValueError("all examples of a batch need the same number of responses")
    segs = [seg for e, ex in enumerate(examples) for seg in _segments(ex, e * k1, prefix_sharing)]
    if not segs:
        segs = [([pad_id], [0], [0], [], [1])]
    rows = [segs] if layout == "packed" else [[seg] for seg in segs]
    length = max(sum(len(seg[0]) for seg in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    branch = torch.zeros((len(rows), length), dtype=torch.long)
    score_pos, score_ids, score_seq = [], [], []
    seq_lens: list[list[int]] = []
    for r, row in enumerate(rows):
        off, lens = 0, []
        for ids, pos, br, scores, _ in row:
            n = len(ids)
            input_ids[r, off : off + n] = torch.tensor(ids)
            position_ids[r, off : off + n] = torch.tensor(pos)
            branch[r, off : off + n] = torch.tensor(br)
            for at, tok, seq in scores:
                score_pos.append(r * length + off + at)
                score_ids.append(tok)
                score_seq.append(seq)
            lens.append(n)
            off += n
        if layout == "padded" and off < length:
            position_ids[r, off:] = torch.arange(off, length)
        seq_lens.append(lens)
    flat_lens = [n for lens in seq_lens for n in lens]
    cu = torch.zeros(len(flat_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(flat_lens, dtype=torch.int32), 0)
    real = sum(flat_lens)
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, branch=branch,
        score_pos=torch.tensor(score_pos, dtype=torch.long), score_ids=torch.tensor(score_ids, dtype=torch.long),
        score_seq=torch.tensor(score_seq, dtype=torch.long), seq_lens=seq_lens,
        runs=[[seg[4] for seg in row] for row in rows], cu_seqlens=cu,
        example_ids=[ex.index for ex in examples], responses_per_example=k1, layout=layout,
        pad_fraction=1.0 - real / input_ids.numel() if examples else 1.0, prefix_sharing=prefix_sharing,
    )


@functools.lru_cache(maxsize=2)  # called every step; the permutation changes only once per epoch
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example order of one epoch: a function of seed and epoch only, never of the world size (a run
    resumed on another world size sees the same examples in the same steps)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_counts(cfg, examples: int, source: str = "the data", dropped_overlong: int = 0) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over `examples` examples. ConfigError/DataError, naming
    the key, when not one step fits."""
    from sempa_dist.config import ConfigError
    from sempa_dist.data.sources import DataError

    B = cfg.train.global_batch_size
    if not examples:  # every row dropped while tokenising (e.g. data.max_length shorter than the prompt)
        raise DataError(f"{source}: all {dropped_overlong} examples are longer than data.max_length="
                        f"{cfg.data.max_length} tokens and were dropped (data.overlong=drop): raise data.max_length "
                        "or use data.overlong=truncate")
    if examples < B:
        raise ConfigError(f"train.global_batch_size: {B} is larger than the dataset ({examples} examples)")
    per_epoch = examples // B
    return per_epoch, cfg.train.max_steps or max(1, math.ceil(cfg.train.num_epochs * per_epoch))


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
