#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into .cuda/ (git-ignored) and prints the NVCC= line to use.
# Idempotent: seconds when already installed. Pinned to 13.0 because the GPU machines' driver is
# CUDA 13.0 and cannot JIT newer PTX.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/.cuda"
nvcc="$dir/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
"$nvcc" --version >/dev/null
echo "NVCC=$nvcc"
