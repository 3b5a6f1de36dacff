"""Is generation preserved? Policy vs reference on held-out text, no hub needed.

- Mean per-token NLL on (a) a general English sample written for this project
  (``data/bundled/heldout_english.txt``) and (b) held-out paraphrase responses: chosen sentences of
  SNLI *test* triplets given their paraphrase prompt (training uses other rows), when
  ``SEMPA_DATA_DIR`` has them.
- KL(policy || reference) of the next-token distributions at those responses' positions
  (teacher-forced, full vocabulary, chunked so no [tokens, vocab] tensor outlives a chunk).
- A few greedy paraphrases from both models, kept as an artifact for a human look.

Relative changes are reported as (policy - reference) / reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sempa_dist.config import DataConfig
from sempa_dist.data.tokenize import TokenizedExample, encode_prompts
from sempa_dist.logprobs import SequenceScorer, unwrap_causal_lm
from sempa_dist.packing import PackedBatch, build_batch, first_fit_decreasing
from sempa_dist.paths import BUNDLED_HELDOUT_ENGLISH

KINDS = ("responses", "english")  # held-out paraphrase responses; the general English sample


def english_sample() -> list[str]:
    return [ln.strip() for ln in BUNDLED_HELDOUT_ENGLISH.read_text(encoding="utf-8").splitlines() if ln.strip()]


def heldout_pairs(limit: int = 200) -> list[tuple[str, str]]:
    """(anchor, chosen) pairs the demo never trains on: SNLI test triplets, if on disk."""
    from sempa_dist.data.sources import DataError, load_triplets

    try:
        rows, _ = load_triplets(DataConfig(source="snli", split="test", max_examples=limit), seed=0)
    except (DataError, FileNotFoundError):
        return []
    return [(r["anchor"], r["chosen"]) for r in rows]


def _examples(tokenizer, pairs: list[tuple[str, str]], texts: list[str]) -> list[TokenizedExample]:
    """Scored sequences: prompt -> response for pairs; whole text after its first token for texts."""
    cfg = DataConfig()
    eos = [tokenizer.eos_token_id]
    out = []
    # the prompts as training tokenises them: data text stays text (encode_prompts)
    prompts = encode_prompts(tokenizer, [anchor for anchor, _ in pairs], cfg)
    for prompt, (_, chosen) in zip(prompts, pairs, strict=True):
        response = tokenizer(chosen, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out.append(TokenizedExample(prompt, [response + eos], len(out)))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(TokenizedExample(ids[:1], [ids[1:]], len(out)))
    return out


def _scored_logprobs(scorer: SequenceScorer, batch: PackedBatch, chunk: int = 256):
    """Full-vocabulary log-softmax at scored positions, in chunks: yields ([n, V] log-probs, targets, seq ids)."""
    hidden = scorer.hidden_states(batch)
    flat = hidden.reshape(-1, hidden.shape[-1])
    head = unwrap_causal_lm(scorer.model).get_output_embeddings()
    for start in range(0, len(batch.score_pos), chunk):
        sl = slice(start, start + chunk)
        yield F.log_softmax(head(flat[batch.score_pos[sl]]).float(), dim=-1), batch.score_ids[sl], batch.score_seq[sl]


@torch.no_grad()
def compare_models(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, pairs, texts,
                   batch_tokens: int = 2048) -> dict[str, float]:
    """NLL per token of each model on `pairs` responses and `texts`, and mean per-token KL(policy || ref)."""
    examples = _examples(tokenizer, pairs, texts)
    kind_of = torch.tensor([0] * len(pairs) + [1] * len(texts))  # index into KINDS, per example
    scorers = [SequenceScorer(m.eval(), "sdpa", 1024) for m in (policy, reference)]
    totals = torch.zeros(len(KINDS), 4, dtype=torch.float64)  # per kind: NLL policy, NLL reference, KL, tokens
    for group in first_fit_decreasing([ex.num_tokens for ex in examples], batch_tokens):
        batch = build_batch([examples[i] for i in group], "packed", tokenizer.pad_token_id or 0)
        streams = [_scored_logprobs(s, batch) for s in scorers]
        for (lp_pol, tgt, seq), (lp_ref, _, _) in zip(*streams, strict=True):
            nll_pol = -lp_pol.gather(-1, tgt[:, None]).squeeze(-1)
            nll_ref = -lp_ref.gather(-1, tgt[:, None]).squeeze(-1)
            kl = (lp_pol.exp() * (lp_pol - lp_ref)).sum(-1)
            # one response per example: a batch's sequence s is its example group[s]
            kind = kind_of[torch.tensor(group)[seq]]
            totals.index_add_(0, kind, torch.stack([nll_pol, nll_ref, kl, torch.ones_like(kl)], 1).double())
    out: dict[str, float] = {}
    for k, (pol_sum, ref_sum, kl_sum, n) in zip(KINDS, totals.tolist(), strict=True):
        if not n:
            continue
        pol, ref = pol_sum / n, ref_sum / n
        out.update({f"nll_policy/{k}": pol, f"nll_reference/{k}": ref, f"nll_change/{k}": (pol - ref) / ref,
                    f"kl/{k}": kl_sum / n, f"tokens/{k}": n})
    return out


@torch.no_grad()
def greedy_paraphrases(model: torch.nn.Module, tokenizer, anchors: list[str], max_new_tokens: int = 40) -> list[str]:
    """The model's greedy answer to the paraphrase instruction for each anchor."""
    cfg = DataConfig()
    outs = []
    for prompt in encode_prompts(tokenizer, list(anchors), cfg):
        ids = torch.tensor([prompt])
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def generation_report(policy_path: str | Path, reference_name: str | Path, n_pairs: int = 200,
                      n_samples: int = 5) -> dict[str, Any]:
    """Load both models (fp32, one process) and compare them on held-out text."""
    from sempa_dist.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(reference_name))
    models = [load_model(p) for p in (policy_path, reference_name)]
    pairs = heldout_pairs(n_pairs)
    report: dict[str, Any] = compare_models(models[0], models[1], tokenizer, pairs, english_sample())
    anchors = [a for a, _ in pairs[:n_samples]] or english_sample()[:n_samples]
    samples = [greedy_paraphrases(m, tokenizer, anchors) for m in models]
    report["samples"] = [{"anchor": a, "policy": p, "reference": r} for a, p, r in zip(anchors, *samples, strict=True)]
    return report
