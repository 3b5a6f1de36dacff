"""Shared fixtures (kept small)."""

from __future__ import annotations

import os

import pytest

# The suite's multi-process runs are CPU ranks over gloo, also on a GPU host (one GPU cannot hold two
# ranks; sempa_dist.distributed.device_type). The GPU path has its own check: bench/gpu_check.py.
os.environ.setdefault("SEMPA_DEVICE", "cpu")

pytest_plugins = ["tests.mlflow_server"]  # the `mlflow_server` fixture (a real server process group)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny-llama BPE tokenizer (ChatML template); built once and cached by sempa_dist.models."""
    from sempa_dist.models import load_tokenizer

    return load_tokenizer("tiny-llama")
