"""Checkpoints that are never half-used, resume, and export to a plain HF model directory.

Layout under ``<output_dir>/checkpoints``: one directory per tag (``step-000120``) holding
DeepSpeed's per-rank shards, our ``trainer_state.json`` (data position, RNG, run ids) and a
``COMPLETE`` marker written after every rank finished. ``latest`` is a one-line file replaced
atomically only after that marker exists, so a crash mid-save leaves the previous checkpoint as
the one ``resume: auto`` picks.

Resume on another world size (N ranks wrote it, M resume it): DeepSpeed's ZeRO-3 shards are flat
per-rank partitions that only the same N can load. Such a checkpoint is converted once by DeepSpeed's
``ds_to_universal`` into ``<tag>/universal`` (one file per parameter and state: fp32 weights, Adam
``exp_avg``/``exp_avg_sq``; world-size free) and loaded by an engine whose DeepSpeed config sets
``checkpoint.load_universal``, each rank cutting out its new partition. Weights, optimizer state,
LR schedule and our trainer state all carry over, and the data position is the step (the example
order depends on seed and epoch only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from sempa_dist.distributed import DistInfo, all_reduce_sum, barrier
from sempa_dist.fileio import atomic_dir, write_atomic

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"  # <tag>/universal: DeepSpeed's universal conversion of the tag, made on demand


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_of(step: int) -> str:
    """The checkpoint directory name of `step`."""
    return f"step-{step:06d}"


def save(engine, output_dir: str | Path, step: int, state: dict[str, Any], dist: DistInfo, keep: int,
         protect: tuple[str, ...] = ()) -> Path:
    """Collective: every rank must call. Returns the tag directory. Pruning keeps the newest `keep`
    complete checkpoints and the tags in `protect` (the best one, under eval.select_best)."""
    root = checkpoint_root(output_dir)
    tag = tag_of(step)
    if dist.is_main and (root / tag).exists():
        # an older run's tag of the same name (a fresh run in a reused output_dir): its COMPLETE marker
        # must not vouch for shards this save has not written yet
        shutil.rmtree(root / tag)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"sempa": state}, save_latest=False)
    barrier()  # every shard is on disk before the checkpoint is declared complete
    if dist.is_main:
        tag_dir = root / tag
        write_atomic(tag_dir / "trainer_state.json", json.dumps(state, default=str))
        write_atomic(tag_dir / COMPLETE, "ok\n")
        write_atomic(root / "latest", tag + "\n")
        _prune(root, keep, protect)
    barrier()
    return root / tag


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / COMPLETE).is_file())


def _prune(root: Path, keep: int, protect: tuple[str, ...] = ()) -> None:
    tags = complete_tags(root)
    for tag in tags[:-keep]:
        if tag not in protect:
            shutil.rmtree(root / tag, ignore_errors=True)
    # incomplete directories older than the newest complete one are debris of crashed saves
    newest = tags[-1] if tags else ""
    for d in root.iterdir():
        if d.is_dir() and d.name < newest and not (d / COMPLETE).is_file():
            shutil.rmtree(d, ignore_errors=True)


BEST = "best.json"


def read_best(output_dir: str | Path, upto_step: int) -> dict[str, Any] | None:
    """The best checkpoint so far under eval.select_best ({task, step, score, checkpoint}), as the run
    recorded it, if it is still complete and not past `upto_step` (the step a resumed run starts from)."""
    path = checkpoint_root(output_dir) / BEST
    if not path.is_file():
        return None
    best = json.loads(path.read_text())
    complete = (checkpoint_root(output_dir) / best["checkpoint"] / COMPLETE).is_file()
    return best if complete and best["step"] <= upto_step else None


def write_best(output_dir: str | Path, best: dict[str, Any]) -> None:
    """Record the best checkpoint (rank 0, after the save that made it complete)."""
    write_atomic(checkpoint_root(output_dir) / BEST, json.dumps(best) + "\n")


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'never' -> None; 'auto' -> the latest COMPLETE checkpoint or None; a path -> that checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (root / tag / COMPLETE).is_file():
                return root / tag
        tags = complete_tags(root)  # `latest` missing or pointing at debris: newest complete one
        return root / tags[-1] if tags else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete sempa-dist checkpoint (no {COMPLETE} marker)")
    return path


def resume_hint(output_dir: str | Path) -> str:
    """Where a failed or stopped run of `output_dir` would continue from: for its error messages."""
    last = find_resume("auto", output_dir)
    return f"last complete checkpoint: {last} (train.resume=auto continues from it)" if last else "no checkpoint was completed"


def rng_state(device: torch.device) -> dict[str, list[int]]:
    """The generator states a resumed run needs to continue exactly: the CPU generator's, and on a
    GPU the device generator's (dropout and any sampling on the device draw from it)."""
    state = {"torch_rng": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators rng_state saved (rank 0's, on every rank and any world size). A GPU state is
    set only on a GPU: a checkpoint written on GPUs resumes on CPUs too, and the reverse."""
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda_rng"], dtype=torch.uint8), device)


def load(engine, tag_dir: Path, universal: bool = False) -> dict[str, Any]:
    """Collective: restore engine (weights, optimizer, scheduler) and return our trainer state.
    Every file is loaded weights-only (sempa_dist.safe_load): a tampered one raises UnsafeCheckpointError.

    `universal`: load `tag_dir`'s universal conversion (see `prepare_universal`); the engine must
    have been built with ``checkpoint.load_universal`` in its DeepSpeed config."""
    if universal:
        if not engine.load_universal_checkpoint():
            raise RuntimeError("checkpoint.load(universal=True) needs an engine built with "
                               "DeepSpeed config checkpoint.load_universal=true")
        load_dir, tag = tag_dir, UNIVERSAL  # DeepSpeed reads <load_dir>/<tag>/zero/<param>/*.pt
    else:
        load_dir, tag = tag_dir.parent, tag_dir.name
    from sempa_dist.safe_load import weights_only_loads

    # DeepSpeed unpickles with weights_only=False: a tampered shard must not run code on resume
    with weights_only_loads(tag_dir):
        _, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    if client is None or "sempa" not in client:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return client["sempa"]


def saved_world_size(tag_dir: Path) -> int:
    """Ranks that wrote `tag_dir`: trainer_state.json's world_size, else its count of ZeRO shards."""
    state_file = tag_dir / "trainer_state.json"
    if state_file.is_file():
        world = json.loads(state_file.read_text()).get("world_size")
        if world:
            return int(world)
    shards = list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if not shards:
        raise FileNotFoundError(f"{tag_dir}: no ZeRO optimizer shards (*zero_pp_rank_*_optim_states.pt)")
    return len(shards)


def needs_universal(tag_dir: Path | None, world_size: int) -> bool:
    """Whether resuming `tag_dir` on `world_size` ranks must go through the universal format: only
    when the world size changed (the same world size keeps the direct per-rank shard load)."""
    return tag_dir is not None and saved_world_size(tag_dir) != world_size


def convert_to_universal(tag_dir: Path) -> Path:
    """`<tag_dir>/universal`, DeepSpeed's universal checkpoint of `tag_dir`, converted on first use
    and reused after. One process, no process group (rank 0 calls it; tests may call it directly).

    The conversion is written under a temporary name and renamed into place with a COMPLETE marker,
    so a crash mid-conversion never leaves a half universal checkpoint that a later resume trusts.
    It runs as a separate process (`python -m deepspeed.checkpoint.ds_to_universal`): its worker
    pool then forks a process without CUDA or process-group state, and its memory (every shard is
    read) is returned before the engines are built."""
    out = tag_dir / UNIVERSAL
    if (out / COMPLETE).is_file():
        return out
    for debris in [out, *tag_dir.glob(f".{UNIVERSAL}.tmp*")]:  # an earlier conversion that crashed
        shutil.rmtree(debris, ignore_errors=True)
    cpus = os.cpu_count() or 1
    with atomic_dir(out) as tmp:
        # through safe_load: the converter unpickles every shard, and must do so weights-only
        cmd = [sys.executable, "-m", "sempa_dist.safe_load", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(tag_dir), "--output_folder", str(tmp), "--num_extract_workers", str(min(4, cpus)),
               "--num_merge_workers", str(min(2, cpus))]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # ds_to_universal points a `latest_universal` file beside its output at the temporary name:
        # we always name the tag when loading, so it would only mislead
        (tag_dir / "latest_universal").unlink(missing_ok=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            raise RuntimeError(f"{tag_dir}: conversion to DeepSpeed's universal checkpoint failed "
                               f"(exit {proc.returncode}):\n{tail}")
        write_atomic(tmp / COMPLETE, "ok\n")
    return out


def prepare_universal(tag_dir: Path, dist: DistInfo) -> Path:
    """Collective: rank 0 converts `tag_dir` (or finds its cached conversion) while the others wait.
    A failed conversion fails every rank at once (rank 0 with the converter's error) instead of
    leaving the others in a barrier until the collective timeout. Checkpoints live on shared
    storage, so every node sees rank 0's files."""
    error: Exception | None = None
    if dist.is_main:
        try:
            convert_to_universal(tag_dir)
        except Exception as e:  # raised below, once every rank knows
            error = e
    failed = all_reduce_sum(torch.tensor([float(error is not None)], device=dist.device))
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"{tag_dir}: rank 0 could not convert it to a universal checkpoint (see rank 0's error)")
    return tag_dir / UNIVERSAL


# ----------------------------------------------------------------------------------------------
# The policy's weights, reassembled from a checkpoint's shards (sempa_dist/export.py writes them out)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the policy reassembled from the ZeRO-3 shards (no process group needed), every
    file loaded weights-only (sempa_dist.safe_load): a tampered one raises UnsafeCheckpointError."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sempa_dist.safe_load import weights_only_loads

    with weights_only_loads(tag_dir):  # zero_to_fp32 unpickles with weights_only=False
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    # keys are those of SequenceScorer: strip its `model.` prefix
    return {k.removeprefix("model."): v for k, v in sd.items()}
