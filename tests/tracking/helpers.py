"""What the tracking tests share besides the `store` fixture (conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sempa_dist.config import Config, load_config
from sempa_dist.distributed import DistInfo
from sempa_dist.tracking import open_client
from tests.distributed import REPO

RANK0 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def client(uri: str) -> Any:
    """A client for `uri`, as the trainer opens it."""
    return open_client(uri)


def cfg_for(run_dir: Path, uri: str, *overrides: str) -> Config:
    """The tiny CPU config, run into `run_dir` and tracked in `uri`."""
    return load_config(REPO / "configs/tiny_cpu.yaml", [f"train.output_dir={run_dir}", f"tracking.uri={uri}", *overrides])


def steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    """The steps at which run `run_id` holds metric `key`, sorted."""
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))
