#!/bin/bash
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
cd "$(dirname "$0")/.."
LLAMATUNE_POISON=1 stage/gpu-tests --test-threads=1 --nocapture attention whole fifty offloaded evaluation > $OUT/tests.log 2>&1; echo "tests rc=$?"
grep -E "test result|FAILED|panicked" $OUT/tests.log | head
grep -E "llama2-7b (rope_)?attention" $OUT/tests.log | head -40
for v in base-gpu-bench gpu-bench; do echo "== $v"; stage/$v --bench "attention" 2>&1 | grep -E "^attention|time:|thrpt:" ; done > $OUT/kbench.log
cat $OUT/kbench.log
B="bench --device cuda --shape llama2-7b --steps 5 --warmup-steps 2 --target-modules q_proj,v_proj --lora-r 64 --lora-alpha 16 --lora-dropout 0.1 --optim paged_adamw_32bit --decode-tokens 0"
for i in 1 2; do
  for v in base-llamatune llamatune; do
    echo "== $v run $i" >> $OUT/ab.log
    stage/$v $B 2>&1 | grep -E "train step|peak mem" >> $OUT/ab.log
  done
done
cat $OUT/ab.log
timeout 150 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 3 stage/gpu-tests --test-threads=1 attention_forward_backward > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; tail -2 $OUT/memcheck.log
