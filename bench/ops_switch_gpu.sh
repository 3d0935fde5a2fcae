#!/usr/bin/env bash
# One device call (<= 9.5 min): the operator benchmark against vLLM's kernels (carry .peers), the
# merge-kernel tile sweep (per-module and grouped launches) and the WeightSwitcher switch time at
# LLaVA-1.5-7B shapes vs PEFT. Run from the repository root with OUT set. Afterwards, here:
#   cp $files_at/lora_ops.jsonl bench/results/ops/lora_ops_h200.jsonl   (then summarize_lora_ops.py)
#   cp $files_at/merge_sweep.jsonl bench/results/serve/merge-sweep-h200.jsonl
#   cp $files_at/switch.{jsonl,md} bench/results/serve/switch-h200-grouped.{jsonl,md}
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 320 python3 bench/ops/bench_lora_ops.py --out "$OUT/lora_ops.jsonl" \
  --time-budget "${BENCH_BUDGET:-270}" > "$OUT/bench.log" 2>&1
timeout 100 python3 bench/orchestrator/merge_kernel_sweep.py --out "$OUT" > "$OUT/merge_sweep.log" 2>&1
timeout 100 python3 bench/orchestrator/bench_switch.py --out "$OUT" > "$OUT/switch.log" 2>&1
tail -n 8 "$OUT/bench.log"
tail -n 36 "$OUT/merge_sweep.log"
grep -E "^\| valora|^\| peft" "$OUT/switch.log" | tail -n 8
