"""Preference data: sources -> validated triplets -> tokenised examples."""

from sempa_dist.data.sources import DataError, LoadReport, data_dir, load_triplets
from sempa_dist.data.tokenize import TokenizedExample, TokenizeReport, render_prompt, tokenize_triplets

__all__ = [
    "DataError", "LoadReport", "TokenizeReport", "TokenizedExample",
    "data_dir", "load_triplets", "render_prompt", "tokenize_triplets",
]
