"""The run's data, on every rank: triplets -> tokenised examples (shared by the trainer and the bench)."""

from __future__ import annotations

from sempa_dist.config import Config
from sempa_dist.data.sources import LoadReport, load_triplets
from sempa_dist.data.tokenize import TokenizedExample, TokenizeReport, tokenize_triplets
from sempa_dist.distributed import DistInfo, barrier
from sempa_dist.models import load_tokenizer


def prepare_data(cfg: Config, dist: DistInfo) -> tuple[object, list[TokenizedExample], LoadReport, TokenizeReport]:
    """(tokenizer, examples, load report, tokenise report). Rank 0 goes first so the others reuse its
    tokenisation cache instead of every rank writing the same one."""
    tokenizer = load_tokenizer(cfg.model.name) if dist.is_main else None
    if not dist.is_main:
        barrier()
        tokenizer = load_tokenizer(cfg.model.name)
    triplets, load_report = load_triplets(cfg.data, seed=cfg.train.seed)
    examples, tok_report = tokenize_triplets(triplets, tokenizer, cfg.data)
    if dist.is_main:
        barrier()
    return tokenizer, examples, load_report, tok_report
