#!/usr/bin/env bash
# bash bench/gpu_wheels.sh [DIR]   (default .whl, ignored by git)
#
# The wheels bench/gpu_check.py needs on a GPU image that has torch, transformers, peft and triton but
# no deepspeed or datasets, and no network (bench/README.md). Run it here, where pip works; the wheels
# are for CPython 3.12 on x86-64 Linux, whatever this machine is. About 50 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# deepspeed is an sdist whose setup.py imports torch: build it here with no ops compiled (pure Python;
# it JIT-builds an op only when one is used, and the SemPA path uses none: torch's own AdamW)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$("$PY" -c 'from importlib.metadata import version; print(version("deepspeed"))')"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# deepspeed's requirements the image lacks, and datasets (tokenisation cache) with its own; pyarrow too,
# since datasets needs a newer one than an image may have
"$PY" -m pip download -q --no-deps "${plat[@]}" -d "$DIR" hjson pydantic pydantic-core annotated-types \
  typing-inspection "datasets==$("$PY" -c 'from importlib.metadata import version; print(version("datasets"))')" dill multiprocess pyarrow
du -sh "$DIR"
