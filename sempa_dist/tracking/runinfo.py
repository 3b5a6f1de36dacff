"""What describes a run besides its config: the code's git state, the accelerator, the nodes."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # the checkout holding this code


def git_info(path: Path = REPO) -> dict[str, str]:
    """Commit and dirty flag (tracked files changed) of the checkout holding this code."""
    if not (path / ".git").exists():
        return {"git.commit": "not a git checkout"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {"git.commit": f"unknown ({type(e).__name__})"}
    if head.returncode != 0:
        return {"git.commit": "unknown (no commit)"}
    commit = head.stdout.strip()
    return {"git.commit": commit, "mlflow.source.git.commit": commit,
            "git.dirty": str(bool(status.stdout.strip())).lower()}


def accelerator_name() -> str:
    """GPU model and count on CUDA machines, else the CPU model and core count."""
    torch = sys.modules.get("torch")  # not imported here: a tool that never loaded torch need not pay for it
    if torch is not None and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return f"cpu: {model} ({os.cpu_count()} cores)"


def node_list(dist: Any) -> list[str]:
    """Hostnames of every rank, deduplicated in rank order. Collective when the world has several ranks."""
    hosts = [socket.gethostname()]
    torch = sys.modules.get("torch")
    if dist.world_size > 1 and torch is not None and torch.distributed.is_initialized():
        hosts = [None] * dist.world_size
        torch.distributed.all_gather_object(hosts, socket.gethostname())
    return list(dict.fromkeys(hosts))


def environment_tags(nodes: list[str]) -> dict[str, str]:
    """The run's tags about where and from what code it ran: nodes, accelerator, git, Slurm job."""
    tags = {"nodes": ",".join(nodes), "accelerator": accelerator_name(), **git_info()}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags
