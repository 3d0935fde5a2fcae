#!/usr/bin/env bash
# Device call of session 14 (≈ 9 min): the skinny GEMM with M specialised or not
# (skinny_specialise.py), then the 300-point LoRA-operator grid (bench_lora_ops.py, valora vs vLLM
# vs the PEFT loop vs gathered bmm vs the base GEMM) at the current defaults — the rank-major `B`
# layout, never run through the grid before. Carry .peers (vLLM's kernels). Afterwards:
#   python bench/ops/summarize_lora_ops.py <dir>/lora_ops.jsonl --markdown <dir>/summary.md --plot <dir>/lora_ops.png
#   SHA=<tree> OUT=... bash bench/ops/grid_rank_major_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt"
PYTHONPATH=$PWD:$PWD/bench/ops timeout 120 python3 bench/ops/skinny_specialise.py \
  --out "$OUT/skinny_specialise.jsonl" --sha "$SHA" > "$OUT/skinny_specialise.log" 2>&1
timeout ${GRID_TIMEOUT:-430} python3 bench/ops/bench_lora_ops.py --out "$OUT/lora_ops.jsonl" \
  --time-budget "${BENCH_BUDGET:-400}" --sha "$SHA" > "$OUT/bench.log" 2>&1
echo "grid exit $?" >> "$OUT/bench.log"
tail -n 4 "$OUT/skinny_specialise.log"
tail -n 3 "$OUT/bench.log"; wc -l "$OUT/lora_ops.jsonl"
