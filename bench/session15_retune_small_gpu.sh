#!/usr/bin/env bash
# Device call of session 15 (≈ 7.5 min): re-tune the T = 1 / 16 buckets (ranks 16 / 64) for the
# rank-major `B` layout on top of the table from the first re-tune call (T = 64 / 256 / 1024,
# bench/results/ops/retune-rank-major-h200-9fe9c76/), then the 300-point grid with the result.
# Carry .peers.     SHA=<tree> OUT=... bash bench/session15_retune_small_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"
TABLE=valora/ops/tables/NVIDIA_H200.json
cp bench/results/ops/retune-rank-major-h200-9fe9c76/NVIDIA_H200.json "$R/NVIDIA_H200.json"
VALORA_LORA_B_LAYOUT=rank timeout 200 python3 -m valora.ops.tuning --tokens 1,16 --ranks 16,64 \
  --no-resume --out "$R/NVIDIA_H200.json" --time-budget 170 2>&1 | tr '\r' '\n' | tail -n 4 \
  > "$R/tune_log.txt"
cp "$R/NVIDIA_H200.json" "$TABLE"
timeout 270 python3 bench/ops/bench_lora_ops.py --out "$R/lora_ops.jsonl" --time-budget 235 \
  --sha "$SHA-retuned-small" > "$R/bench.log" 2>&1
echo "grid exit $?" >> "$R/bench.log"
cat "$R/tune_log.txt"; tail -n 2 "$R/bench.log"; wc -l "$R/lora_ops.jsonl"
