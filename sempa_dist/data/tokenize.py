"""Prompt rendering and tokenisation of preference triplets (HF datasets.map, batched, cached).

A tokenised example is ``prompt_ids`` plus ``responses`` = [chosen, rejected_1 .. rejected_K],
each response ending in EOS. Only response tokens are scored (the loss mask).

A prompt is either an anchor sentence (put into ``data.template``, with ``data.system_prompt``,
through the chat template) or, for rows that carry one (ms-swift's ``messages`` files), a list of
chat turns taken as written: only the chat template is applied to them.

Data is always text: a sentence (or a turn's content) that contains a special-token string such as
``<|im_end|>`` is tokenised as the characters it is, never as the control token; only the template's
own special tokens are control tokens. Responses get this from ``split_special_tokens=True``; a prompt
mixes template and data in one string, so `encode_prompts` knows where the data lies in it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sempa_dist.config import DataConfig
from sempa_dist.paths import cache_root

Messages = Sequence[Mapping[str, str]]  # chat turns: {"role": ..., "content": ...}
Prompt = str | Messages  # an anchor sentence, or the prompt turns of a messages row
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: stands for data text while the template renders
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    responses: list[list[int]]  # [chosen, rejected_1, ..., rejected_K]
    index: int = 0  # position in the dataset: keys precomputed reference log-probs

    @property
    def num_tokens(self) -> int:
        """Tokens this example occupies when every response is its own prompt+response sequence."""
        return sum(len(self.prompt_ids) + len(r) for r in self.responses)


@dataclass
class TokenizeReport:
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def prompt_messages(anchor: str, cfg: DataConfig) -> list[dict[str, str]]:
    """The chat turns for an anchor sentence: ``data.system_prompt`` (if any), then ``data.template``
    with the anchor in place of ``{sentence}``."""
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": cfg.template.replace("{sentence}", anchor)})
    return messages


def _uses_chat_template(tokenizer, cfg: DataConfig) -> bool:
    return bool(cfg.use_chat_template and getattr(tokenizer, "chat_template", None))


def render_with_spans(tokenizer, prompt: Prompt, cfg: DataConfig) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and the (start, end) character spans of the data in it (the anchor sentence,
    or every turn's content), so that a special-token string inside the data can be told from the
    template's own. The template renders with placeholders in place of the data, which is put back
    afterwards: the data itself never passes through the template."""
    if isinstance(prompt, str):
        data = [prompt]
        messages = prompt_messages(_PLACEHOLDER.format(0), cfg)
    else:
        data = [str(m["content"]) for m in prompt]
        messages = [{"role": m["role"], "content": _PLACEHOLDER.format(i)} for i, m in enumerate(prompt)]
    if _uses_chat_template(tokenizer, cfg):
        shape = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif isinstance(prompt, str):
        shape = messages[-1]["content"] + "\n"  # the template text alone: no system turn without a chat template
    else:
        shape = "\n".join(m["content"] for m in messages) + "\n"  # the turns as written, one per line
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = length = 0
    for m in _PLACEHOLDER_RE.finditer(shape):
        text = data[int(m.group(1))]
        parts += [shape[pos:m.start()], text]
        length += m.start() - pos
        spans.append((length, length + len(text)))
        length += len(text)
        pos = m.end()
    parts.append(shape[pos:])
    return "".join(parts), spans


def render_prompt(tokenizer, prompt: Prompt, cfg: DataConfig) -> str:
    """The prompt as text: for an anchor sentence the paraphrase instruction, through the chat
    template when the model has one; for a list of turns (a messages row) the turns as written, only
    the chat template applied. Tokenise it with `encode_prompts`, which keeps data text as text."""
    return render_with_spans(tokenizer, prompt, cfg)[0]


def _control_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's special added tokens (content -> id): the strings that would otherwise be
    control tokens wherever they appear."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {tok.content: i for i, tok in decoder.items() if getattr(tok, "special", False) and tok.content}


def encode_prompts(tokenizer, prompts: Sequence[Prompt], cfg: DataConfig) -> list[list[int]]:
    """Token ids of each prompt, with the template's special tokens as control tokens and the data's
    text as text, however it is written.

    A prompt whose data contains no special-token string is tokenised in one piece, as before. One
    whose data does is tokenised as the text between the template's own control tokens (found with
    the offsets of the plain tokenisation: a control token outside every data span), each piece with
    ``split_special_tokens=True``, and the control tokens put back between them. The tokenizer already
    encodes the text between two added tokens on its own, so the pieces are what the plain
    tokenisation would give, except that the data's special-token strings stay characters."""
    if not prompts:  # a fast tokenizer given no text raises
        return []
    use_bos = not _uses_chat_template(tokenizer, cfg)  # a chat template writes its own start tokens
    rendered = [render_with_spans(tokenizer, p, cfg) for p in prompts]
    out = tokenizer([text for text, _ in rendered], add_special_tokens=use_bos)["input_ids"]
    controls = _control_ids(tokenizer)
    if not controls:
        return out
    pattern = _control_pattern(controls)
    for i, (text, spans) in enumerate(rendered):
        if any(pattern.search(text, a, b) for a, b in spans):
            out[i] = _encode_guarded(tokenizer, text, spans, use_bos, controls)
    return out


def _control_pattern(controls: dict[str, int]) -> re.Pattern:
    return re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))  # longest first


def _encode_guarded(tokenizer, text: str, spans: list[tuple[int, int]], use_bos: bool,
                    controls: dict[str, int]) -> list[int]:
    """`text` tokenised with only the template's control tokens (those outside `spans`) recognised."""
    control_ids = set(controls.values())

    def in_data(start: int, end: int) -> bool:
        return any(start < b and end > a for a, b in spans)

    try:
        enc = tokenizer(text, add_special_tokens=use_bos, return_offsets_mapping=True)
        marks = [(s, e, t) for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
                 if t in control_ids and not in_data(s, e)]
    except (NotImplementedError, ValueError):  # a tokenizer without offsets: find the template's tokens by text
        bos = tokenizer(" ", add_special_tokens=use_bos)["input_ids"][:1] if use_bos else []
        marks = [(0, 0, t) for t in bos if t in control_ids]
        marks += [(m.start(), m.end(), controls[m.group()])
                  for m in _control_pattern(controls).finditer(text) if not in_data(*m.span())]
    pieces: list[str] = []
    cursor = 0
    for start, end, _ in marks:
        pieces.append(text[cursor:start])
        cursor = max(cursor, end)
    pieces.append(text[cursor:])
    encoded = tokenizer(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids: list[int] = list(encoded[0])
    for (_, _, token), piece in zip(marks, encoded[1:], strict=True):
        ids += [token, *piece]
    return ids


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = json.dumps([tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256((vocab + extra).encode()).hexdigest()[:16]


def data_fingerprint(triplets: list[dict[str, Any]], tokenizer, cfg: DataConfig) -> str:
    """Identifies the tokenised data: rows + tokenizer + template + length policy."""
    h = hashlib.sha256()
    for t in triplets:
        h.update(json.dumps(t, sort_keys=True, ensure_ascii=False).encode())
    # a change of how text is encoded invalidates old caches: the markers name how data text is encoded
    settings = [cfg.template, cfg.system_prompt, cfg.use_chat_template, cfg.max_length, cfg.overlong,
                "responses: split_special_tokens", "prompts: data text split_special_tokens"]
    h.update(json.dumps(settings).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:20]


def tokenize_triplets(
    triplets: list[dict[str, Any]], tokenizer, cfg: DataConfig, num_proc: int | None = None
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenise with datasets.map (cached under data.cache_dir by fingerprint) and apply data.overlong."""
    import datasets

    fp = data_fingerprint(triplets, tokenizer, cfg)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "datasets"
    cache_dir.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # a messages row carries its prompt turns (taken as written); other rows only the anchor sentence
        turns = batch["prompt"] if "prompt" in batch else [None] * len(batch["anchor"])
        prompt_ids = encode_prompts(tokenizer, [t or a for a, t in zip(batch["anchor"], turns, strict=True)], cfg)
        out_p, out_r, status = [], [], []
        for p, chosen, rejected in zip(prompt_ids, batch["chosen"], batch["rejected"], strict=True):
            texts = [chosen, *rejected]
            # data text is text: an "<|im_end|>" inside a sentence must not become the real end-of-turn token
            ids_list = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            resp = [ids + [eos] for ids in ids_list]
            room = cfg.max_length - len(p)
            over = any(len(r) > room for r in resp)
            if over and (cfg.overlong == "drop" or room < 1):
                status.append("dropped")
            elif over:
                resp = [r[:room] for r in resp]
                status.append("truncated")
            else:
                status.append("ok")
            out_p.append(p)
            out_r.append(resp)
        return {"prompt_ids": out_p, "responses": out_r, "status": status}

    if not triplets:  # Dataset.from_list([]) has no columns: map() would never create "status"
        return [], TokenizeReport(fingerprint=fp)
    ds = datasets.Dataset.from_list(triplets)
    ds = ds.map(
        encode, batched=True, batch_size=256, remove_columns=ds.column_names,
        cache_file_name=str(cache_dir / f"tok-{fp}.arrow"), new_fingerprint=fp,
        num_proc=num_proc, desc="tokenising",
    )
    status = ds["status"]
    report = TokenizeReport(
        truncated=status.count("truncated"), dropped_overlong=status.count("dropped"), fingerprint=fp
    )
    examples = [
        TokenizedExample(p, r, i)
        for i, (p, r, s) in enumerate(zip(ds["prompt_ids"], ds["responses"], status, strict=True))
        if s != "dropped"
    ]
    report.kept = len(examples)
    return examples, report
