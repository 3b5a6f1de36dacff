"""Checkpoints that are never half-used, resume, and export to a plain HF model directory.

Layout under ``<output_dir>/checkpoints``: one directory per tag (``step-000120``) holding
DeepSpeed's per-rank shards, our ``trainer_state.json`` (data position, RNG, run ids) and a
``COMPLETE`` marker written after every rank finished. ``latest`` is a one-line file replaced
atomically only after that marker exists, so a crash mid-save leaves the previous checkpoint as
the one ``resume: auto`` picks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sempa_dist.distributed import DistInfo, barrier

COMPLETE = "COMPLETE"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(engine, output_dir: str | Path, step: int, state: dict[str, Any], dist: DistInfo, keep: int) -> Path:
    """Collective: every rank must call. Returns the tag directory."""
    root = checkpoint_root(output_dir)
    tag = f"step-{step:06d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"sempa": state}, save_latest=False)
    barrier()  # every shard is on disk before the checkpoint is declared complete
    if dist.is_main:
        tag_dir = root / tag
        _write_atomic(tag_dir / "trainer_state.json", json.dumps(state, default=str))
        _write_atomic(tag_dir / COMPLETE, "ok\n")
        _write_atomic(root / "latest", tag + "\n")
        _prune(root, keep)
    barrier()
    return root / tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / COMPLETE).is_file())


def _prune(root: Path, keep: int) -> None:
    tags = complete_tags(root)
    for tag in tags[:-keep]:
        shutil.rmtree(root / tag, ignore_errors=True)
    # incomplete directories older than the newest complete one are debris of crashed saves
    newest = tags[-1] if tags else ""
    for d in root.iterdir():
        if d.is_dir() and d.name < newest and not (d / COMPLETE).is_file():
            shutil.rmtree(d, ignore_errors=True)


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


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Collective: restore engine (weights, optimizer, scheduler) and return our trainer state."""
    _, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None or "sempa" not in client:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    return client["sempa"]


# ----------------------------------------------------------------------------------------------
# Export: checkpoint shards -> consolidated HF directory (safetensors), on one process.


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the policy reassembled from the ZeRO-3 shards (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    # keys are those of SequenceScorer: strip its `model.` prefix
    return {k.removeprefix("model."): v for k, v in sd.items()}


def export(tag_dir: Path, out_dir: Path, cfg, merge_lora: bool = True) -> Path:
    """Write `out_dir` loadable by AutoModelForCausalLM.from_pretrained (LoRA merged, or as adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sempa_dist.models import resolve_model

    path = resolve_model(cfg.model.name)
    sd = consolidated_state_dict(tag_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.model.lora.enabled:
        from peft import get_peft_model

        from sempa_dist.engines import peft_lora_config

        model = get_peft_model(model, peft_lora_config(cfg))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"export: checkpoint does not match the model: missing={sorted(set(missing) - tied)[:5]} "
                           f"unexpected={unexpected[:5]}")
    if cfg.model.lora.enabled and merge_lora:
        model = model.merge_and_unload()
    elif cfg.model.lora.enabled:  # adapter only: the base is the model named in the config
        model.peft_config["default"].base_model_name_or_path = str(path)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
