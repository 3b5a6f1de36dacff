"""Checks that fail a run before any process group, model or dataset is touched.

A run that trains for hours and then cannot write its checkpoint loses all of it; so the run
directory must be writable and hold at least one checkpoint's worth of free space up front. And a
fresh run must not land in a directory holding another run's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
from pathlib import Path

from sempa_dist.config import Config


class PreflightError(RuntimeError):
    """The run cannot start; the message names the key and the offending value."""


def check_fresh_run(resume: str, output_dir: str | Path) -> None:
    """A fresh run (`resume: never`) must not mix its checkpoints with an earlier run's in the same
    directory (`latest`, pruning and resume would pick between them)."""
    from sempa_dist.checkpoint import checkpoint_root, complete_tags

    tags = complete_tags(checkpoint_root(output_dir))
    if resume == "never" and tags:
        raise PreflightError(
            f"train.output_dir: {output_dir} already holds checkpoints of an earlier run ({', '.join(tags[-2:])}); "
            "continue it with train.resume=auto, or give a new train.output_dir"
        )


def check_writable(output_dir: str | Path) -> None:
    """Create `output_dir` if needed and write + remove a probe file in it."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{socket.gethostname()}-{os.getpid()}"  # ranks may share the directory
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"train.output_dir: {path} is not writable ({e.strerror or e})") from None


def _safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors headers (no weights read)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def estimate_checkpoint_bytes(cfg: Config) -> int:
    """Rough size of one checkpoint: the weights in their training dtype (ZeRO-3 saves every
    partition) plus fp32 Adam moments and master copies of what is trained. 0 when the model is
    not a local directory (a hub id is only resolved by the ranks)."""
    from sempa_dist.models import REGISTRY, resolve_model

    if cfg.model.name not in REGISTRY and not Path(cfg.model.name).expanduser().is_dir():
        return 0
    shapes = _safetensors_shapes(Path(resolve_model(cfg.model.name)))
    total = sum(_numel(s) for s in shapes.values())
    if cfg.model.lora.enabled:  # r x (in + out) per adapted matrix; all-linear = every 2-D weight but embeddings/head
        r = cfg.model.lora.r
        trained = sum(r * sum(s) for k, s in shapes.items()
                      if len(s) == 2 and "embed" not in k and "lm_head" not in k)
    else:
        trained = total
    weight_bytes = 2 if cfg.model.dtype == "bf16" else 4
    return total * weight_bytes + trained * 12


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_free_space(cfg: Config) -> None:
    """At least one checkpoint (estimated) must fit in the run directory's filesystem."""
    need = estimate_checkpoint_bytes(cfg)
    path = Path(cfg.train.output_dir)
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need:
        raise PreflightError(
            f"train.output_dir: {cfg.train.output_dir} has {free / 2**20:.1f} MiB free, one checkpoint of "
            f"{cfg.model.name} needs about {need / 2**20:.1f} MiB; free space or choose another train.output_dir"
        )


def check_attention(cfg: Config) -> None:
    """The attention kernel asked for must train where the ranks run (this process's device and the
    dtype model.dtype gives there): the flash kernels need a GPU, bf16/fp16 and their package; flex_varlen
    a flex backward, which torch 2.13 lacks on CPU."""
    from sempa_dist.attention import resolve_attn_implementation
    from sempa_dist.distributed import device_type
    from sempa_dist.engines import training_dtype

    device = device_type()
    try:
        resolve_attn_implementation(cfg.model.attn_implementation, device, training_dtype(cfg, device))
    except RuntimeError as e:
        raise PreflightError(str(e)) from None


def preflight(cfg: Config) -> None:
    """All checks, in the order a user would fix them."""
    check_attention(cfg)
    check_fresh_run(cfg.train.resume, cfg.train.output_dir)
    check_writable(cfg.train.output_dir)
    check_free_space(cfg)
