"""Prompt rendering and tokenisation of preference triplets (HF datasets.map, batched, cached).

A tokenised example is ``prompt_ids`` plus ``responses`` = [chosen, rejected_1 .. rejected_K],
each response ending in EOS. Only response tokens are scored (the loss mask).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sempa_dist.config import DataConfig
from sempa_dist.paths import cache_root


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


def render_prompt(tokenizer, anchor: str, cfg: DataConfig) -> str:
    """The paraphrase instruction for `anchor`, through the chat template when the model has one."""
    text = cfg.template.replace("{sentence}", anchor)
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + "\n"


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = json.dumps([tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256((vocab + extra).encode()).hexdigest()[:16]


def data_fingerprint(triplets: list[dict[str, Any]], tokenizer, cfg: DataConfig) -> str:
    """Identifies the tokenised data: rows + tokenizer + template + length policy."""
    h = hashlib.sha256()
    for t in triplets:
        h.update(json.dumps(t, sort_keys=True, ensure_ascii=False).encode())
    settings = [cfg.template, cfg.system_prompt, cfg.use_chat_template, cfg.max_length, cfg.overlong,
                "responses: split_special_tokens"]  # a change of how text is encoded invalidates old caches
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
    use_bos = not (cfg.use_chat_template and getattr(tokenizer, "chat_template", None))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = [render_prompt(tokenizer, a, cfg) for a in batch["anchor"]]
        prompt_ids = tokenizer(prompts, add_special_tokens=use_bos)["input_ids"]
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
