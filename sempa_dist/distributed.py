"""Process-group set-up that works the same under torchrun, the deepspeed launcher, srun and alone.

torchrun and the deepspeed launcher export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. A plain
``srun python -m sempa_dist.train`` (and ``deepspeed --launcher slurm``) sets only SLURM_*
variables, so they are mapped here. A process started alone is a world of one.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_launcher() -> bool:
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _map_slurm_env() -> None:
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        raise RuntimeError(
            "started by srun without MASTER_ADDR: export MASTER_ADDR (first node of the job) and MASTER_PORT "
            "in the batch script (slurm/train_8x8.sh does)"
        )
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def device_type() -> str:
    """Where this process computes: ``SEMPA_DEVICE`` (cpu | cuda | auto, default auto = cuda when a
    GPU is visible). cpu on a GPU machine runs CPU ranks over gloo, e.g. the test suite's 2-process
    runs on a one-GPU host."""
    want = os.environ.get("SEMPA_DEVICE", "auto").strip().lower() or "auto"
    if want not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"SEMPA_DEVICE: expected cpu, cuda or auto, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SEMPA_DEVICE=cuda, but torch sees no CUDA GPU here")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def setup_accelerator_env() -> None:
    """DeepSpeed picks its accelerator at import: make it the CPU one where this process runs on CPU."""
    if device_type() == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_s: int) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU)."""
    setup_accelerator_env()
    _map_slurm_env()
    env = os.environ
    if "RANK" not in env:  # alone: a world of one
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if device_type() == "cuda":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # two ranks on a 2-core box: one intra-op thread each, or they fight for the cores
        torch.set_num_threads(max(1, int(env.get("OMP_NUM_THREADS", max(1, (os.cpu_count() or 1) // max(1, world))))))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False,
            rank=rank, world_size=world,
        )
    return DistInfo(rank, world, local, device, backend)


def shutdown_distributed() -> None:
    """Destroy the process group after a clean finish, so that an in-process caller (the demo, a
    one-process run) does not carry a live gloo group into interpreter teardown, where it can abort
    the process (pytorch issue 190489); rank processes also skip that teardown (train.exit_rank).
    Only on success: after a failure a peer may sit in a collective, and destroying the group could
    wait for it.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
