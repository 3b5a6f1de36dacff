"""Run information: the code's git state, the accelerator and the nodes, as tags."""

from __future__ import annotations

import socket
import subprocess

import torch

from sempa_dist.tracking.runinfo import REPO, accelerator_name, environment_tags, git_info, node_list
from tests.tracking.helpers import RANK0


def test_git_info_names_this_checkout(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    info = git_info()
    assert info["git.commit"] == info["mlflow.source.git.commit"] == head.stdout.strip()
    assert info["git.dirty"] in ("true", "false")
    assert git_info(tmp_path) == {"git.commit": "not a git checkout"}


def test_environment_tags_on_one_process(monkeypatch):
    assert node_list(RANK0) == [socket.gethostname()]  # one rank: no collective
    if not torch.cuda.is_available():
        assert accelerator_name().startswith("cpu: ")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = environment_tags(["node-a", "node-b"])
    assert tags["nodes"] == "node-a,node-b" and tags["slurm_job_id"] == "4242" and tags["git.commit"]
    monkeypatch.delenv("SLURM_JOB_ID")
    assert "slurm_job_id" not in environment_tags(["node-a"])
