"""Weights-only loading of checkpoint files: a tampered ``.pt`` file cannot run code.

DeepSpeed 0.19.8 reads checkpoint files with ``torch.load(weights_only=False)`` (its
TorchCheckpointEngine, ZeRO-3's universal loader, ``zero_to_fp32``, ``ds_to_universal``), which
runs whatever a file's pickle asks for. Inside `weights_only_loads` every ``torch.load`` of this
process is a weights-only load, whatever its call site passes: torch's own switch
``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides the argument, read at each call. Beyond torch's
defaults only `CHECKPOINT_GLOBALS` may be unpickled. A file needing anything else is refused
with an `UnsafeCheckpointError` naming it, before any of its code could run.

Tools that read checkpoints in a process of their own run through this module:
``python -m sempa_dist.safe_load MODULE [ARG ...]`` runs MODULE as ``python -m MODULE`` would,
with the same rule (and its forked workers inherit it).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
# All our checkpoints need beyond torch's defaults: the ZeRO-3 optimizer shards (fp32, bf16 and
# LoRA runs, and their universal conversion) pickle the stage enum and DeepSpeed's static loss
# scaler; ZeRO-2's shards also a fragment_address (a dataclass of two ints: where a parameter lies in
# its flat group). Found with torch.serialization.get_unsafe_globals_in_checkpoint.
CHECKPOINT_GLOBALS: list[type] = [ZeroStageEnum, LossScaler, fragment_address]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file whose pickle asks for more than tensors and plain data."""


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals `path`'s pickle names beyond torch's safe set and CHECKPOINT_GLOBALS, read statically
    (nothing in the file runs). A file that is no ``torch.save`` archive is reported as such."""
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except ValueError:  # a bare pickle or TorchScript: never what DeepSpeed writes
            return ["<not a torch.save archive>"]
        except RuntimeError as e:  # a truncated or corrupt archive
            return [f"<unreadable: {e}>"]


def _refusal(where: Path, error: Exception) -> str:
    """The message for a refused load: which files under `where` are unsafe, and what they ask for."""
    files = [where] if where.is_file() else sorted(where.rglob("*.pt"))
    bad = {f: g for f in files if (g := unsafe_globals(f))}
    if not bad:
        return f"{where}: a checkpoint file could not be loaded weights-only: {error}"
    lines = [f"refusing to load {f}: it asks to unpickle {', '.join(g)}, which a weights-only load does "
             "not allow (a tampered or foreign file?)" for f, g in bad.items()]
    return "\n".join(lines)


@contextlib.contextmanager
def weights_only_loads(where: str | Path) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only with CHECKPOINT_GLOBALS allowed; an unsafe file
    raises UnsafeCheckpointError naming the offending file(s) under `where` (a file or directory)."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_refusal(Path(where), e)) from e
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


def main(argv: list[str] | None = None) -> int:
    """``python -m sempa_dist.safe_load MODULE [ARG ...]``: run MODULE's ``__main__`` under
    `weights_only_loads`; directories among the arguments are searched for the file to blame."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m sempa_dist.safe_load MODULE [ARG ...]", file=sys.stderr)
        return 2
    module, args = argv[0], argv[1:]
    dirs = [Path(a) for a in args if Path(a).is_dir()]
    sys.argv = [module, *args]
    try:
        with weights_only_loads(dirs[0] if dirs else Path.cwd()):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except UnsafeCheckpointError as e:
        print(f"sempa_dist.safe_load: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
