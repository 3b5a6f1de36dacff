"""Preference data: sources -> validated triplets -> tokenised examples."""

from sempa_dist.data.sources import DataError, LoadReport, load_triplets
from sempa_dist.data.tokenize import (
    TokenizedExample,
    TokenizeReport,
    encode_prompts,
    prompt_messages,
    render_prompt,
    tokenize_triplets,
)
from sempa_dist.paths import data_dir  # re-exported: sempa_dist.data.data_dir was public before paths.py

__all__ = [
    "DataError", "LoadReport", "TokenizeReport", "TokenizedExample",
    "data_dir", "encode_prompts", "load_triplets", "prompt_messages", "render_prompt", "tokenize_triplets",
]
