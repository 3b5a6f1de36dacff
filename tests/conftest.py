"""Shared fixtures (kept small)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.mlflow_server"]  # the `mlflow_server` fixture (a real server process group)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny-llama BPE tokenizer (ChatML template); built once and cached by sempa_dist.models."""
    from sempa_dist.models import load_tokenizer

    return load_tokenizer("tiny-llama")
