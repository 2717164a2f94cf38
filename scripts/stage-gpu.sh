#!/usr/bin/env bash
# Builds the CUDA-enabled release binary and the GPU test binary here (no GPU needed), strips them,
# and stages them with a runner in ./stage, so testing on a GPU host without Rust is:
#   copy ./stage there, then `bash stage/run.sh [OUT_DIR]`.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="$(bash scripts/install-nvcc.sh)"
export NVCC
cargo build --release --locked --features cuda --bin llamatune
exe=$(cargo test --release --locked --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu" and m.get("executable"):
        print(m["executable"])')
bench=$(cargo bench --locked --features cuda --bench gpu_kernels --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu_kernels" and m.get("executable"):
        print(m["executable"])')
rm -rf stage && mkdir -p stage
cp target/release/llamatune stage/llamatune
cp "$exe" stage/gpu-tests
cp "$bench" stage/gpu-bench
strip stage/llamatune stage/gpu-tests stage/gpu-bench
cat > stage/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs the GPU checks on this host; logs go to ${1:-.}; further arguments go to the test binary.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-.}"
mkdir -p "$out"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
# The SmolLM2 test reads the GGUF from the llamatune cache (checksum-verified; the host has no network).
export LLAMATUNE_CACHE="${LLAMATUNE_CACHE:-$here/../.cache/llamatune}"
echo "== GPU tests (kernel vs CPU reference, whole step, 50 steps, SmolLM2)"
# Poisoned outputs: every op's output buffer starts as NaN, so an element a kernel leaves unwritten
# fails its comparison (the sanitizers below run without it: initcheck must see the real allocations).
LLAMATUNE_POISON=1 "$here/gpu-tests" --test-threads=1 --nocapture "${@:2}" 2>&1 | tee "$out/gpu-tests.log"
status=${PIPESTATUS[0]}
if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck on the kernel tests"
    compute-sanitizer --tool memcheck --error-exitcode 3 "$here/gpu-tests" --test-threads=1 \
        --skip fifty_gpu_steps --skip smollm2 2>&1 | tail -40 | tee "$out/sanitizer.log"
    echo "sanitizer exit: ${PIPESTATUS[0]}"
fi
exit $status
RUN
chmod +x stage/run.sh
# What was staged: the commit, and whether the tree had uncommitted changes.
{ git rev-parse HEAD; git status --porcelain --untracked-files=no | grep -q . && echo "with uncommitted changes"; } \
    > stage/rev.txt || true
du -sh stage
