#!/usr/bin/env bash
# bench/gpu_check.py from a fresh checkout, in one command, on a machine with an NVIDIA GPU:
#   scripts/gpu-check.sh [gpu_check.py options]
# Uses $PYTHON (default: .cache/gpu-venv/bin/python) when it already imports the project's packages;
# otherwise makes .cache/gpu-venv with Python 3.11+ and installs the project with the `gpu` extra
# (onnxruntime-gpu, never the CPU onnxruntime beside it) and `dev` (the check reuses the tests'
# server helper). That install needs a package index; on a host without one, point PYTHON at an
# interpreter that has the packages (or carry wheels and set PIP_FIND_LINKS + PIP_NO_INDEX=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.cache/gpu-venv/bin/python}"
needs='import torch, torchvision, open_clip, bentoml, onnxruntime, httpx, psutil, pytest'
if ! { [ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null; } || ! "$PYTHON" -c "$needs" 2>/dev/null; then
  echo "gpu-check: installing the project with the gpu extra into .cache/gpu-venv" >&2
  python3 -m venv .cache/gpu-venv
  .cache/gpu-venv/bin/pip install --quiet ".[gpu,dev]"
  PYTHON=.cache/gpu-venv/bin/python
fi
if "$PYTHON" -m pip show onnxruntime >/dev/null 2>&1; then
  echo "gpu-check: $PYTHON has the CPU onnxruntime, which cannot use the GPU and must not sit beside onnxruntime-gpu: $PYTHON -m pip uninstall -y onnxruntime && $PYTHON -m pip install onnxruntime-gpu" >&2
  exit 2
fi
exec "$PYTHON" bench/gpu_check.py "$@"
