"""Export: a checkpoint's policy as a plain Hugging Face model directory (safetensors), on one
process, no GPU or process group needed.

Layout of ``out_dir`` (written as a whole or not at all, `fileio.atomic_dir`):

- full fine-tuning, or LoRA merged (the default): the merged causal LM and its tokenizer, plus the
  sentence-transformers files (`sempa_dist.st_export`: ``SentenceTransformer(out_dir)`` gives
  sempa-eval's embeddings); for LoRA also ``adapter/``, the PEFT adapter (adapter_config.json +
  adapter_model.safetensors, ``base_model_name_or_path`` = the resolved base model), what the
  SemPA authors' evaluation loads on top of the base;
- LoRA with ``merge_lora=False`` (``sempa-export --keep-adapter``): ``out_dir`` is the adapter itself.

The adapter lives inside the export rather than beside it: one directory is one atomic unit (a
crash never leaves a merged model without its adapter, or the reverse), `sempa-export OUT` names
one output, and the HF / sentence-transformers loaders only read the files at the top level.

Every weight comes from the consolidated fp32 state dict of the ZeRO-3 shards, loaded into a plain
CPU model before anything is saved. Trainers that save an adapter straight from a ZeRO-3 engine
can write its partitioned, zero-sized placeholders (an adapter that is silently empty); here that
cannot happen, and `_check_adapter` refuses to finish an export whose adapter file lacks a LoRA
weight or holds an empty one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sempa_dist.checkpoint import consolidated_state_dict
from sempa_dist.fileio import atomic_dir

ADAPTER_DIR = "adapter"  # <export>/adapter for LoRA runs exported merged


@dataclass(frozen=True)
class ExportedModel:
    """What `export_model` wrote. `str()` / `os.fspath()` give `root`, the export directory (what
    callers recorded before the adapter and sentence-transformers files existed)."""

    root: Path
    model: Path | None  # the full causal LM (merged LoRA or full fine-tuning); None: adapter-only export
    adapter: Path | None  # the PEFT adapter directory of a LoRA run
    sentence_transformers: bool  # whether `SentenceTransformer(root)` loads it (st_export wrote its files)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def summary(self) -> dict[str, str | bool | None]:
        """For summary.json: where each part is (None: not written)."""
        return {"export": str(self.root), "export_model": str(self.model) if self.model else None,
                "export_adapter": str(self.adapter) if self.adapter else None,
                "export_sentence_transformers": self.sentence_transformers}


def export_model(tag_dir: Path, out_dir: Path, cfg, merge_lora: bool = True) -> ExportedModel:
    """Write `out_dir` (layout in the module docstring): loadable by AutoModelForCausalLM.from_pretrained
    and SentenceTransformer, with the PEFT adapter in `<out_dir>/adapter` for LoRA; or, for LoRA with
    `merge_lora=False`, the adapter alone."""
    from transformers import AutoModelForCausalLM

    from sempa_dist.models import load_tokenizer, resolve_model
    from sempa_dist.st_export import write_sentence_transformers_files

    out_dir = Path(out_dir)
    lora = cfg.model.lora.enabled
    path = resolve_model(cfg.model.name)
    sd = consolidated_state_dict(tag_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        from peft import get_peft_model

        from sempa_dist.engines import peft_lora_config

        model = get_peft_model(model, peft_lora_config(cfg))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"export: checkpoint does not match the model: missing={sorted(set(missing) - tied)[:5]} "
                           f"unexpected={unexpected[:5]}")
    # the tokenizer sempa-eval and training use (a pad token set): the export then encodes the same
    tokenizer = load_tokenizer(cfg.model.name)
    full_dir: Path | None = out_dir
    adapter_dir: Path | None = None
    st_files = False
    with atomic_dir(out_dir) as tmp:
        if lora:
            adapter_dir = out_dir / ADAPTER_DIR if merge_lora else out_dir
            tmp_adapter = tmp / ADAPTER_DIR if merge_lora else tmp
            # saved before merging: merge_and_unload folds the LoRA weights into the base in place
            model.peft_config["default"].base_model_name_or_path = str(path)
            model.save_pretrained(tmp_adapter, safe_serialization=True)
            tokenizer.save_pretrained(tmp_adapter)
            _check_adapter(tmp_adapter, model)
            if merge_lora:
                model = model.merge_and_unload()
            else:
                full_dir = None
        if full_dir is not None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            ev = cfg.eval  # the run's embedding settings: what sempa-eval and eval.* used
            st_files = write_sentence_transformers_files(tmp, tokenizer, model.config.hidden_size, ev.prompt,
                                                         ev.pooling, ev.normalize)
    return ExportedModel(root=out_dir, model=full_dir, adapter=adapter_dir, sentence_transformers=st_files)


def _check_adapter(adapter_dir: Path, peft_model) -> None:
    """The adapter file holds every LoRA weight of `peft_model`, none of them empty: the failure
    other ZeRO-3 trainers show (an adapter saved from partitioned parameters) must never pass."""
    from safetensors import safe_open

    expected = sum(1 for name, _ in peft_model.named_parameters() if ".lora_" in name)
    with safe_open(os.fspath(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (not iterable)
    lora = {k: s for k, s in shapes.items() if ".lora_" in k}
    empty = [k for k, s in lora.items() if not s or 0 in s]
    if len(lora) != expected or empty or expected == 0:
        raise RuntimeError(f"export: the adapter in {adapter_dir} is incomplete: {len(lora)} LoRA tensors of "
                           f"{expected} expected, empty: {empty[:5]}")
