#!/usr/bin/env bash
# One device session in phases (each phase is one `run` call on the GPU host; logs under OUT):
#   a OUT: GPU tests (every kernel vs the CPU) + sanitizer, `llamatune bench` on SmolLM2 and 7B shapes
#   b OUT: the parity suite without its 7B part and without SmolLM2 (needs .cache/bnb and
#          .cache/llama2-tokenizer carried)
#   s1 OUT, then s2 OUT at once (the host must stay warm; scripts/stage-smollm2.sh first; SMOL_TIMEOUT
#          seconds for the SmolLM2 test, default 200): s1 (carry
#          .cache/smolA) keeps the GGUF's first half and the gzipped gpu-tests and llamatune in /tmp;
#          s2 (carry .cache/smolB and .cache/bnb) joins the GGUF, checks its sha256, runs the SmolLM2
#          GPU test with poisoned outputs and the parity suite's SmolLM2 rows (logits, tokenizer)
#   c OUT: the side-by-side benchmark against transformers + PEFT + bitsandbytes
#   k OUT: the criterion kernel bench (7B shapes, cuBLAS and copy-bandwidth rivals) and torch's SDPA and
#          fp32 cross-entropy timed in the same session (parity/torch_rivals.py)
#   ab OUT: A/B against the baseline staged by scripts/stage-base.sh: the 7B training step of the classic
#          and (AB_ALL_LINEAR=1) all-linear recipes, base and new alternating twice, and the criterion
#          kernel bench rows matching AB_FILTER (default "attention") for both binaries, alternating
#          AB_KERNEL_ROUNDS times (default 2; each run ~30 s, most of it the bench's setup); AB_VARIANTS
#          adds runs of the new build with settings (e.g. "base new new:LLAMATUNE_KEEP_EXPANDED=0") and
#          of variants staged by scripts/stage-variant.sh (e.g. "base new down4 down4:LLAMATUNE_PDL=0")
#   abdecode OUT: the same alternation for the 7B greedy decode (128 new tokens after a 1-step bench)
#   p OUT: where the 7B classic step's device time goes, op by op, timed by CUDA events with nothing
#          synchronized (LLAMATUNE_PROFILE=events: the ops' times add up to the step's), beside the
#          plain step time of the same build
#   attn OUT: ncu of the flash kernels inside the 7B classic step (one launch each: speed of light,
#          occupancy, launch statistics, warp states with every stall reason, shared-memory wavefronts
#          and bank conflicts), then the criterion attention rows and torch's SDPA in the same session
#   lora OUT: ncu of the LoRA split kernels inside the 7B all-linear step (the A product over x's 4,096
#          and 11,008 columns, dA, du; one launch each): speed of light, memory workload (L1, L2,
#          DRAM), occupancy, launch statistics, warp states with every stall reason, tensor-pipe use
#   census OUT: every kernel of one 7B step (classic, then all-linear; no warm-up) under ncu with the
#          clocks and caches left alone: duration, DRAM and L2 bytes per launch, summed by kernel name
#          (scripts/ncu_census.py); their total against the plain step's time is what the kernels
#          leave out (launch gaps, host waits, the busy card's lower clock)
#   energy OUT: joules per 7B step and the board's mean power over the timed steps (`llamatune bench`'s
#          "train energy" line: NVML's energy counter around them), classic and all-linear, STEPS timed
#          steps (default 12) after 2, ENERGY_ARGS appended to each bench (e.g. keep flags)
#   dcensus OUT: every kernel of whole decoded tokens under ncu, clocks and caches left alone: a
#          40-token 7B decode after a 16-token training step, launches 4001-4700 (past the step and
#          the prompt's prefill: ~3,000 launches), summed per token by `ncu_census.py --from argmax_f32`
#   floor OUT: what one launch that only streams a 7B GEMV's bytes reaches (parity/stream_floor.py,
#          torch's sums and copy, warm and cold), beside the GEMV bench rows of the same run
# The GGUF (98 MB) travels in two parts because one call carries at most 64 MiB.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=$1 out=$2
mkdir -p "$out" /tmp/llc
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export LLAMATUNE_CACHE=/tmp/llc/cache
gguf=$LLAMATUNE_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
# The staged builds' revisions: base, new, and each variant's.
revisions() {
    printf 'base %s, new %s' "$(cat stage/base-rev.txt 2>/dev/null)" "$(cat stage/rev.txt 2>/dev/null)"
    for f in stage/*-rev.txt; do
        local n
        n=$(basename "$f" -rev.txt)
        [ "$n" = base ] || printf ', %s %s' "$n" "$(cat "$f")"
    done
}
# ncu's average stall cycles per issued instruction, by reason (the attn and lora phases).
stall_metrics() {
    printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' barrier long_scoreboard \
        short_scoreboard mio_throttle math_pipe_throttle wait not_selected selected lg_throttle dispatch_stall \
        membar drain no_instruction branch_resolving tex_throttle
}
# Variants staged by scripts/stage-variant.sh travel gzipped; unpacked here.
mkdir -p /tmp/llc/variants
for gz in stage/*-llamatune.gz; do
    [ -e "$gz" ] || continue
    bin=/tmp/llc/variants/$(basename "$gz" .gz)
    gunzip -c "$gz" > "$bin" && chmod +x "$bin"  # always: a warm host may hold an older one
done
# Runs `llamatune bench ARGS...` as A/B variant $1: "base" (stage/base-llamatune), "new", a variant
# NAME staged by scripts/stage-variant.sh, each optionally with ":VAR=value,VAR=value" (those settings).
bench_variant() {
    local variant=$1 bin=stage/llamatune envs=() name
    shift
    name=${variant%%:*}
    [ "$name" = base ] && bin=stage/base-llamatune
    [ "$name" != base ] && [ "$name" != new ] && bin=/tmp/llc/variants/$name-llamatune
    [ -x "$bin" ] || { echo "no binary for variant $name ($bin)" >&2; return 2; }
    [[ $variant == *:* ]] && IFS=, read -ra envs <<< "${variant#*:}"
    timeout 120 env "${envs[@]}" $bin bench --device cuda --shape llama2-7b "$@" 2>&1
}
case $phase in
a)
    bash stage/run.sh "$out/tests" --skip smollm2
    echo "== compute-sanitizer initcheck (uninitialized reads) on the LoRA op and a whole step"
    compute-sanitizer --tool initcheck --error-exitcode 3 stage/gpu-tests --test-threads=1 lora_forward \
        whole_qlora_step 2>&1 | tail -5 | tee "$out/initcheck.log"
    for shape in smollm2-135m llama2-7b; do
        echo "== bench $shape"
        timeout 240 stage/llamatune bench --device cuda --shape $shape --steps ${STEPS:-5} --warmup-steps 1 \
            --decode-tokens 64 --json "$out/bench-$shape.json" 2>&1 | tail -14 | tee "$out/bench-$shape.log"
    done
    echo "== profile llama2-7b training (each op synchronized)"
    LLAMATUNE_PROFILE=1 timeout 200 stage/llamatune bench --device cuda --shape llama2-7b --steps 2 --warmup-steps 1 \
        --decode-tokens 0 2>&1 | tail -30 | tee "$out/profile-llama2-7b-train.log"
    echo "== profile llama2-7b decoding (one training step first)"
    LLAMATUNE_PROFILE=1 timeout 200 stage/llamatune bench --device cuda --shape llama2-7b --steps 1 --warmup-steps 0 \
        --max-seq-length 16 --per-device-train-batch-size 1 --decode-tokens 64 2>&1 | tail -30 \
        | tee "$out/profile-llama2-7b-decode.log"
    ;;
b)
    export PYTHONPATH="$PWD/.cache/bnb:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    timeout 400 bash parity/run.sh "$out/parity" ${PARITY_ONLY:---only=quant,small,curve} --skip-7b \
        --tokenizer=llama2:"$PWD/.cache/llama2-tokenizer" ${PARITY_ARGS:-} 2>&1 | tail -60
    ;;
s1)
    cp .cache/smolA/* /tmp/llc/ && ls -la /tmp/llc
    ;;
s2)
    mkdir -p "$LLAMATUNE_CACHE"
    [ -f /tmp/llc/part-a ] || { echo "s2: no /tmp/llc/part-a (run s1 on this host first)" >&2; exit 2; }
    cat /tmp/llc/part-a .cache/smolB/part-b > "$gguf"
    [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat .cache/smolB/sha256)" ] || { echo "s2: GGUF checksum" >&2; exit 3; }
    for b in gpu-tests llamatune; do
        gunzip -c /tmp/llc/$b.gz > /tmp/llc/$b && chmod +x /tmp/llc/$b
    done
    echo "build $(cat /tmp/llc/rev.txt)" | tee "$out/smollm2.log"
    LLAMATUNE_POISON=1 timeout ${SMOL_TIMEOUT:-200} /tmp/llc/gpu-tests --test-threads=1 --nocapture smollm2 2>&1 | tee -a "$out/smollm2.log"
    /tmp/llc/llamatune debug tokenize --tokenizer "$gguf" --chats /dev/null --output /dev/null \
        --save-tokenizer /tmp/llc/smollm2-tokenizer > /dev/null 2>&1
    # parity/run.sh drives stage/llamatune: the staged binary of s1 stands in for it.
    mkdir -p stage && cp /tmp/llc/llamatune stage/llamatune
    export PYTHONPATH="$PWD/.cache/bnb:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    timeout 200 bash parity/run.sh "$out/parity" --only=none --skip-7b \
        --tokenizer=smollm2:/tmp/llc/smollm2-tokenizer --smollm2-gguf="$gguf" 2>&1 | tail -20
    ;;
k)
    timeout 400 stage/gpu-bench 2>&1 | grep -E "^[A-Za-z].*/|time:|thrpt:" | tee "$out/gpu-bench.log"
    timeout 120 python3 parity/torch_rivals.py "$out/torch-rivals.json"
    ;;
ab)
    [ -x stage/base-llamatune ] || { echo "no stage/base-llamatune: run scripts/stage-base.sh" >&2; exit 2; }
    echo "$(revisions)" | tee "$out/ab.log"
    recipes=("q_proj,v_proj")
    [ "${AB_ALL_LINEAR:-0}" = 1 ] && recipes+=("all-linear")
    # AB_VARIANTS: see bench_variant.
    for targets in "${recipes[@]}"; do
        for round in 1 2; do
            for variant in ${AB_VARIANTS:-base new}; do
                line=$(bench_variant "$variant" --steps ${STEPS:-5} --warmup-steps 2 --target-modules "$targets" \
                    --lora-r 64 --lora-alpha 16 --lora-dropout 0.1 --optim paged_adamw_32bit --decode-tokens 0 \
                    | grep -E "train step|train peak")
                echo "$targets round $round $variant: $(echo $line | tr -s ' ')" | tee -a "$out/ab.log"
            done
        done
    done
    # Alternating rounds: the same kernel has read 5% apart between calls on fresh hosts (session 43),
    # so only rounds of one call are compared.
    for round in $(seq 1 ${AB_KERNEL_ROUNDS:-2}); do
        for side in base new; do
            bin=stage/gpu-bench
            [ $side = base ] && bin=stage/base-gpu-bench
            echo "== kernel bench ($side, round $round)" | tee -a "$out/ab.log"
            timeout 200 $bin --bench "${AB_FILTER:-attention}" 2>&1 | grep -E "^[A-Za-z].*/|time:" | tee -a "$out/ab.log"
        done
    done
    ;;
abdecode)
    echo "$(revisions)" | tee "$out/abdecode.log"
    for round in 1 2; do
        for variant in ${AB_VARIANTS:-base new}; do
            line=$(bench_variant "$variant" --steps 1 --warmup-steps 0 --decode-tokens 128 | grep -E "decoded")
            echo "round $round $variant: $(echo $line | tr -s ' ')" | tee -a "$out/abdecode.log"
        done
    done
    ;;
p)
    bench_variant new --steps 5 --warmup-steps 2 --decode-tokens 0 | grep -E "train step|peak" | tee "$out/profile.log"
    echo "== LLAMATUNE_PROFILE=events, 3 steps after 2 warm-up" | tee -a "$out/profile.log"
    bench_variant new:LLAMATUNE_PROFILE=events --steps 3 --warmup-steps 2 --decode-tokens 0 \
        | grep -vE "^step |^built" | tail -60 | tee -a "$out/profile.log"
    ;;
attn)
    metrics="$(stall_metrics)l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
    for k in flash_bwd_wgmma_hd128 flash_fwd_wgmma_hd128; do  # the step's kernels on sm_90a
        echo "== ncu $k (launch 4 in the step)" | tee -a "$out/ncu-attn.log"
        timeout 200 ncu --kernel-name "$k" --launch-skip 3 --launch-count 1 --section SpeedOfLight \
            --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
            --metrics "$metrics" stage/llamatune bench --device cuda --shape llama2-7b --steps 1 \
            --warmup-steps 0 --decode-tokens 0 2>&1 | grep -vE "^step |^built" | sed -n '/Context/,$p' | tee -a "$out/ncu-attn.log"
    done
    echo "== criterion attention rows" | tee -a "$out/ncu-attn.log"
    timeout 200 stage/gpu-bench --bench attention 2>&1 | grep -E "^[A-Za-z].*/|time:" | tee -a "$out/ncu-attn.log"
    timeout 120 python3 parity/torch_rivals.py "$out/torch-rivals.json" 2>&1 | tail -8 | tee -a "$out/ncu-attn.log"
    ;;
lora)
    metrics="$(stall_metrics)smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
    # Seven launches per layer (the first pass's A products: q, k, v, o, gate, up, down; the backward's
    # dA and du of the seven projections): layer 1's q and down, the backward's second layer's first.
    for spec in "lora_down128_r64 7 A product, x of 4,096 columns (layer 1, q)" \
        "lora_down128_r64 13 A product, x of 11,008 columns (layer 1, down)" \
        "lora_outer128_r64 7 dA (the backward's second layer)" "lora_du_r64_bf16 7 du (the backward's second layer)"; do
        set -- $spec
        k=$1 skip=$2
        shift 2
        echo "== ncu $k, launch $((skip + 1)) in the step: $*" | tee -a "$out/ncu-lora.log"
        timeout 200 ncu --kernel-name "$k" --launch-skip "$skip" --launch-count 1 --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
            --section SchedulerStats --metrics "$metrics" stage/llamatune bench --device cuda --shape llama2-7b \
            --target-modules all-linear --steps 1 --warmup-steps 0 --decode-tokens 0 2>&1 \
            | grep -vE "^step |^built" | sed -n '/Context/,$p' | tee -a "$out/ncu-lora.log"
    done
    ;;
census)
    metrics="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum"
    for recipe in "classic q_proj,v_proj" "all-linear all-linear"; do
        set -- $recipe
        echo "== ncu census of one 7B step, $1" | tee -a "$out/census.log"
        timeout 270 ncu --clock-control none --cache-control none --metrics "$metrics" --csv --page raw \
            --log-file "$out/census-$1.csv" stage/llamatune bench --device cuda --shape llama2-7b \
            --target-modules "$2" --lora-r 64 --lora-alpha 16 --lora-dropout 0.1 --optim paged_adamw_32bit \
            --steps 1 --warmup-steps 0 --decode-tokens 0 > /dev/null 2>&1
        python3 scripts/ncu_census.py "$out/census-$1.csv" 40 | tee -a "$out/census.log"
        gzip -f "$out/census-$1.csv"
    done
    ;;
dcensus)
    metrics="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum"
    timeout 200 ncu --clock-control none --cache-control none --launch-skip 4000 --launch-count 700 \
        --metrics "$metrics" --csv --page raw --log-file "$out/decode-census.csv" stage/llamatune bench \
        --device cuda --shape llama2-7b --steps 1 --warmup-steps 0 --max-seq-length 16 \
        --per-device-train-batch-size 1 --decode-tokens 40 > /dev/null 2>&1
    python3 scripts/ncu_census.py "$out/decode-census.csv" 30 --from argmax_f32 | tee "$out/decode-census.log"
    gzip -f "$out/decode-census.csv"
    ;;
floor)
    timeout 120 python3 parity/stream_floor.py "$out/stream-floor.json" 2>&1 | tee "$out/stream-floor.log"
    timeout 120 stage/gpu-bench --bench "gemv M=1" 2>&1 | grep -E "^gemv|time:|thrpt:" | tee -a "$out/stream-floor.log"
    ;;
energy)
    for targets in q_proj,v_proj all-linear; do
        echo "== $targets ${ENERGY_ARGS:-}" | tee -a "$out/energy.log"
        bench_variant new --steps ${STEPS:-12} --warmup-steps 2 --target-modules $targets --lora-r 64 \
            --lora-alpha 16 --lora-dropout 0.1 --optim paged_adamw_32bit --decode-tokens 0 ${ENERGY_ARGS:-} \
            | grep -E "train step|train peak|train energy" | tee -a "$out/energy.log"
    done
    ;;
c)
    export PYTHONPATH="$PWD/.cache/bnb:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    timeout 540 python3 parity/side_by_side.py stage/llamatune "$out/side" --steps ${STEPS:-5} ${SIDE_ARGS:-} 2>&1 \
        | grep -v "^step \|^built" | tail -40
    ;;
esac
