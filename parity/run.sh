#!/usr/bin/env bash
# Runs the parity suite on a GPU host: llamatune (the staged binary) against transformers, PEFT and
# bitsandbytes (carried as a pruned wheel in .cache/bnb). Usage: bash parity/run.sh [OUT_DIR]
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/parity-out}"
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$here/.cache/bnb:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 "$here/parity/run.py" "$here/stage/llamatune" "$out" "$@"
