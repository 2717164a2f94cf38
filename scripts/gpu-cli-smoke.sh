#!/usr/bin/env bash
# The command line end to end on one device: a random model of a named shape (no download), then
# train (4-bit, LoRA, eval split, checkpoints) → resume → eval → generate → merge, each checked for
# its exit status and its files. Usage: bash scripts/gpu-cli-smoke.sh OUT_DIR [cuda|cpu] [SHAPE]
# (on the GPU host: after scripts/stage-gpu.sh, with stage/ carried; LLAMATUNE selects the binary).
set -euo pipefail
out=$1 device=${2:-cuda} shape=${3:-smollm2-135m}
bin=${LLAMATUNE:-stage/llamatune}
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
rm -rf "$out/model" "$out/run" "$out/merged"
mkdir -p "$out"
step() { echo "== $*"; }

step "random $shape model"
"$bin" debug random-model --shape "$shape" --output-dir "$out/model" --dtype bfloat16
python3 - "$out/data.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "the a llama alpaca eats grass in the high mountains and sleeps under stars near lakes".split()
with open(sys.argv[1], "w") as f:
    for i in range(120):
        n = random.randint(8, 40)
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(n))}) + "\n")
PY

train=("$bin" train --model "$out/model" --dataset "$out/data.jsonl" --output-dir "$out/run" --device "$device"
       --use-4bit true --bnb-4bit-compute-dtype bfloat16 --lora-r 16 --lora-alpha 32 --target-modules all-linear
       --per-device-train-batch-size 4 --max-seq-length 128 --learning-rate 1e-3 --logging-steps 5
       --save-steps 10 --eval-split-ratio 0.1 --eval-steps 10 --group-by-length true)
step "train 20 steps"
"${train[@]}" --max-steps 20 2>&1 | tail -8
step "resume to 30 steps"
"${train[@]}" --max-steps 30 --resume-from-checkpoint latest 2>&1 | tail -4
python3 - "$out/run/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
loss = [r["loss"] for r in rows if "loss" in r]
evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
print(f"logged train losses {[round(x, 3) for x in loss]}, eval losses {[round(x, 3) for x in evals]}")
assert max(r["step"] for r in rows) == 30, "resumed run reached step 30"
assert loss[-1] < loss[0], "training loss went down"
assert evals, "evaluation ran"
PY
ls "$out/run" "$out/run/adapter"
step "eval"
"$bin" eval --model "$out/model" --adapter "$out/run/adapter" --dataset "$out/data.jsonl" --use-4bit \
    --bnb-4bit-compute-dtype bfloat16 --device "$device" --max-seq-length 128 2>&1 | tail -2
step "generate"
"$bin" generate --model "$out/model" --adapter "$out/run/adapter" --use-4bit --bnb-4bit-compute-dtype bfloat16 \
    --device "$device" --raw --prompt "the llama" --max-new-tokens 16 2>&1 | tail -3
step "merge"
"$bin" merge --model "$out/model" --adapter "$out/run/adapter" --output-dir "$out/merged" --dtype bfloat16 2>&1 | tail -1
ls "$out/merged"
echo "CLI smoke on $device: all steps passed"
