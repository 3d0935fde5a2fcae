#!/usr/bin/env bash
# Device call of session 15 (≈ 7 min): gemm_expand.py again (the grouped tile loop), then the
# 300-point LoRA-operator grid with the table whose regular buckets at T = 64 / 256 / 1024, ranks
# 16 / 64, were re-tuned for the rank-major `B` layout (49 of 96 buckets before the tuner's time
# budget ran out: bench/results/ops/retune-rank-major-h200-9fe9c76/). Carry .peers (vLLM's
# kernels, extracted with `extract.sh .peers/vllm`).
#   SHA=<tree> OUT=... bash bench/session15_grid_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{ge,grid}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
PYTHONPATH=$PWD:$PWD/bench/ops timeout 170 python3 bench/ops/gemm_expand.py \
  --out "$R/ge/gemm_expand.jsonl" --sha "$SHA" > "$R/ge/log.txt" 2>&1
echo "gemm_expand exit $?" >> "$R/ge/log.txt"
cp bench/results/ops/retune-rank-major-h200-9fe9c76/NVIDIA_H200.json valora/ops/tables/NVIDIA_H200.json
timeout 280 python3 bench/ops/bench_lora_ops.py --out "$R/grid/lora_ops.jsonl" --time-budget 250 \
  --sha "$SHA-retuned" > "$R/grid/bench.log" 2>&1
echo "grid exit $?" >> "$R/grid/bench.log"
git checkout -q valora/ops/tables/NVIDIA_H200.json 2>/dev/null || true
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 14 "$R/ge/log.txt" | cut -c1-400
tail -n 3 "$R/grid/bench.log"; wc -l "$R/grid/lora_ops.jsonl"
