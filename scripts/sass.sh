#!/usr/bin/env bash
# Shows what a kernel compiles to, without a GPU: builds kernels/FILE.cu for sm_90a with the nvcc of
# scripts/install-nvcc.sh (build.rs's flags), prints ptxas's registers and spills for KERNEL, and writes
# its SASS (cuobjdump from PyPI, installed into .venv-cuda on first use) to target/sass/KERNEL.sass with
# an opcode count per instruction class. Reading the main loop's instructions and how its dependent
# chains are ordered is how several kernels here were tuned (docs/PERF.md).
# Usage: scripts/sass.sh FILE KERNEL   e.g. scripts/sass.sh flash flash_bwd_hd128
set -euo pipefail
cd "$(dirname "$0")/.."
file=${1:?usage: sass.sh FILE KERNEL} kernel=${2:?usage: sass.sh FILE KERNEL}
[ -f "kernels/$file.cu" ] || { echo "sass: no kernels/$file.cu" >&2; exit 2; }
nvcc=$(bash scripts/install-nvcc.sh)
bin=$(dirname "$nvcc")
# cuobjdump and nvdisasm have no 13.0 wheel; 13.2 reads sm_90a cubins from nvcc 13.0.
if [ ! -x "$bin/cuobjdump" ] || [ ! -x "$bin/nvdisasm" ]; then
    .venv-cuda/bin/pip install --quiet --disable-pip-version-check nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
fi
mkdir -p target/sass
cubin=target/sass/$file.cubin
"$nvcc" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas=-v -cubin -o "$cubin" "kernels/$file.cu" 2>&1 \
    | grep -A3 "Compiling entry function '$kernel'" | grep -E "registers|spill" || { echo "sass: no kernel $kernel in $file.cu" >&2; exit 2; }
PATH="$bin:$PATH" "$bin/cuobjdump" -sass -fun "$kernel" "$cubin" > "target/sass/$kernel.sass"
echo "SASS: target/sass/$kernel.sass ($(grep -cE '^\s+/\*[0-9a-f]{4}\*/' "target/sass/$kernel.sass") instructions); by opcode:"
grep -oE '^\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_]+' "target/sass/$kernel.sass" | awk '{print $NF}' \
    | sort | uniq -c | sort -rn | head -20
