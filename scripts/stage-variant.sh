#!/usr/bin/env bash
# Adds a named variant to ./stage for A/B runs on the GPU host: builds revision REV in a worktree
# beside this checkout (scripts/rev-tree.sh: the target directory stage-base.sh builds in) and stages
# its stripped release binary gzipped as stage/NAME-llamatune.gz (~5 MB, where three plain binaries
# would pass the 64 MiB a device call carries). gpu-session.sh unpacks it and takes NAME (or
# NAME:VAR=value,...) in AB_VARIANTS beside base and new.
# Usage: scripts/stage-variant.sh REV NAME
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: stage-variant.sh REV NAME} name=${2:?usage: stage-variant.sh REV NAME}
[[ $name =~ ^[a-z0-9_-]+$ && $name != base && $name != new ]] || { echo "stage-variant: NAME must be [a-z0-9_-]+, not base or new" >&2; exit 2; }
[ -d stage ] || { echo "stage-variant: run scripts/stage-gpu.sh first" >&2; exit 2; }
source scripts/rev-tree.sh
tree=target/variant-tree
open_rev_tree "$rev" "$tree"
(cd "$tree" && cargo build --release --locked --features cuda --bin llamatune)
strip -o "stage/$name-llamatune" "$CARGO_TARGET_DIR/release/llamatune"
gzip -f -9 "stage/$name-llamatune"
git rev-parse "$rev" > "stage/$name-rev.txt"
close_rev_tree "$tree"
echo "staged variant $name at $(cat "stage/$name-rev.txt")"
du -sh stage
