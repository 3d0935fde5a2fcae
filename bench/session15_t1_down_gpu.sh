#!/usr/bin/env bash
# Device call of session 15 (≈ 2.5 min): re-tune the T = 1 `down` buckets (ranks 16 / 64) for the
# rank-major `B` layout — the grid's one point near 0.95× vLLM is T=1 down uniform64 (0.93–0.98×
# over three runs, its bucket still column-tuned) — then the grid's 12 T = 1 points.
# Carry .peers.     SHA=<tree> OUT=... bash bench/session15_t1_down_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"
cp valora/ops/tables/NVIDIA_H200.json "$R/NVIDIA_H200.json"
VALORA_LORA_B_LAYOUT=rank timeout 90 python3 -m valora.ops.tuning --tokens 1 --ranks 16,64 \
  --layers down --no-resume --out "$R/NVIDIA_H200.json" --time-budget 75 2>&1 | tr '\r' '\n' \
  | tail -n 3 > "$R/tune_log.txt"
timeout 45 python3 bench/ops/bench_lora_ops.py --out "$R/before.jsonl" --tokens 1 \
  --sha "$SHA" > "$R/before.log" 2>&1
cp "$R/NVIDIA_H200.json" valora/ops/tables/NVIDIA_H200.json
timeout 45 python3 bench/ops/bench_lora_ops.py --out "$R/after.jsonl" --tokens 1 \
  --sha "$SHA-t1-down" > "$R/after.log" 2>&1
cat "$R/tune_log.txt"; grep -E "^ +1 +down" "$R/before.log" "$R/after.log"
