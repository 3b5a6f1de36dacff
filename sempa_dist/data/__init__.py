"""Preference data: sources -> validated triplets -> tokenised examples."""

from sempa_dist.data.sources import DataError, LoadReport, load_triplets
from sempa_dist.data.tokenize import TokenizedExample, TokenizeReport, render_prompt, tokenize_triplets
from sempa_dist.paths import data_dir  # re-exported: sempa_dist.data.data_dir was public before paths.py

__all__ = [
    "DataError", "LoadReport", "TokenizeReport", "TokenizedExample",
    "data_dir", "load_triplets", "render_prompt", "tokenize_triplets",
]
