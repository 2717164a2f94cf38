# Sourced by stage-base.sh and stage-variant.sh: builds of another revision in a worktree beside this
# checkout, sharing one target directory (target/base), so revisions close to each other rebuild little.
# open_rev_tree REV TREE: TREE holds REV (any worktree left there by an earlier run goes first); NVCC
# and CARGO_TARGET_DIR are exported for the builds. close_rev_tree TREE removes it.
open_rev_tree() {
    local rev=$1 tree=$2
    NVCC="$(bash scripts/install-nvcc.sh)"
    export NVCC
    git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    git worktree prune
    git worktree add --detach "$tree" "$rev" >/dev/null
    export CARGO_TARGET_DIR="$PWD/target/base"
}
close_rev_tree() {
    git worktree remove --force "$1"
}
