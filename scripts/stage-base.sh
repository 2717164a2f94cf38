#!/usr/bin/env bash
# Adds a baseline to ./stage for A/B runs on the GPU host: builds revision REV (default main) in a
# worktree beside this checkout, with its own target directory, and stages its stripped release
# binary and criterion GPU bench as stage/base-llamatune and stage/base-gpu-bench. Run it after
# scripts/stage-gpu.sh (which recreates ./stage); `scripts/gpu-session.sh ab OUT` then times both.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-main}
[ -d stage ] || { echo "stage-base: run scripts/stage-gpu.sh first" >&2; exit 2; }
source scripts/rev-tree.sh
tree=target/base-tree
open_rev_tree "$rev" "$tree"
(cd "$tree" && cargo build --release --locked --features cuda --bin llamatune)
bench=$(cd "$tree" && cargo bench --locked --features cuda --bench gpu_kernels --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu_kernels" and m.get("executable"):
        print(m["executable"])')
cp "$CARGO_TARGET_DIR/release/llamatune" stage/base-llamatune
cp "$bench" stage/base-gpu-bench
strip stage/base-llamatune stage/base-gpu-bench
git rev-parse "$rev" > stage/base-rev.txt
close_rev_tree "$tree"
echo "staged base $(cat stage/base-rev.txt)"
du -sh stage
