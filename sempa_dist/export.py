"""Export: a checkpoint's policy as a plain Hugging Face model directory (safetensors), on one
process, no GPU or process group needed."""

from __future__ import annotations

from pathlib import Path

import torch

from sempa_dist.checkpoint import consolidated_state_dict
from sempa_dist.fileio import atomic_dir


def export_model(tag_dir: Path, out_dir: Path, cfg, merge_lora: bool = True) -> Path:
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
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(path).save_pretrained(tmp)
    return out_dir
