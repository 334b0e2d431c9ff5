#!/usr/bin/env bash
# bench/gpu_check.py from a fresh checkout, in one command, on a machine with an NVIDIA GPU:
#   scripts/gpu-check.sh [gpu_check.py options]        (--dry-run: the same code on the CPU)
# Uses $PYTHON (default: .cache/gpu-venv/bin/python) when it already imports the project's packages;
# otherwise makes .cache/gpu-venv with Python 3.11+ and installs the project with the `gpu` extra
# (onnxruntime-gpu, never the CPU onnxruntime beside it) and `dev` (the check reuses the tests'
# server helper). Everything comes from pip's configured index (PyPI): torch 2.14.1 brings the
# CUDA 13 runtime, cuBLAS and cuDNN 9 as wheels, which onnxruntime-gpu loads (preload_dlls), so the
# host needs only the NVIDIA driver. The check itself uses no network: random ViT-B-32 weights and
# the shipped tiny model, servers on 127.0.0.1, HF_HUB_OFFLINE. On a host without an index, point
# PYTHON at an interpreter that has the packages (or carry wheels: PIP_FIND_LINKS + PIP_NO_INDEX=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.cache/gpu-venv/bin/python}"
needs='import torch, torchvision, open_clip, bentoml, onnxruntime, onnx, httpx, psutil, pytest'
if ! { [ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null; } || ! "$PYTHON" -c "$needs" 2>/dev/null; then
  base=""
  for candidate in python3.11 python3.12 python3.13 python3; do  # 3.11: what the project is tested on
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      base="$candidate"; break
    fi
  done
  if [ -z "$base" ]; then
    echo "gpu-check: needs Python 3.11 or newer (python3.11+ not found on PATH), or PYTHON=<interpreter with the packages>" >&2
    exit 2
  fi
  echo "gpu-check: installing the project with the gpu extra into .cache/gpu-venv ($($base --version))" >&2
  if ! "$base" -m venv .cache/gpu-venv; then
    echo "gpu-check: '$base -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 2
  fi
  .cache/gpu-venv/bin/pip install --quiet ".[gpu,dev]"
  PYTHON=.cache/gpu-venv/bin/python
fi
dry_run=0 torch_only=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --backends=torch) torch_only=1 ;;
  esac
done
if [ "$dry_run" = 0 ] && [ "$torch_only" = 0 ] && "$PYTHON" -m pip show onnxruntime >/dev/null 2>&1; then
  echo "gpu-check: $PYTHON has the CPU onnxruntime, which cannot use the GPU and must not sit beside onnxruntime-gpu: $PYTHON -m pip uninstall -y onnxruntime && $PYTHON -m pip install onnxruntime-gpu (or check torch alone: --backends=torch)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 BENTOML_DO_NOT_TRACK=true
exec "$PYTHON" bench/gpu_check.py "$@"
