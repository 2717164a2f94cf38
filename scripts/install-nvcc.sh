#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into .venv-cuda (no CUDA toolkit needed) and prints the NVCC path.
# 13.0 matches the GPU hosts' driver (580): PTX from a newer nvcc is rejected there, SASS is not.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=.venv-cuda/lib/python3*/site-packages/nvidia/cu13/bin/nvcc
if ! ls $NVCC >/dev/null 2>&1; then
    python3 -m venv .venv-cuda
    .venv-cuda/bin/pip install --quiet --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
echo "$PWD/$(ls $NVCC)"
