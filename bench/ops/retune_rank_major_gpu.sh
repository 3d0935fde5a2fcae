#!/usr/bin/env bash
# Next device session (written in session 14, not run): re-tune the regular LoRA buckets for the
# rank-major `B` layout (the default since session 13; every regular entry of the H200 table was
# tuned on the column layout) where the operator grid's floor bar fails most (T = 64 / 256 /
# 1024, ranks 16 / 64, `bench/results/ops/grid-rank-major-h200-e9a1397/`), into a copy of the
# shipped table, then the 300-point grid with that table. Carry .peers. ≈ 9 minutes. Afterwards,
# if the grid improves: cp $files_at/r/NVIDIA_H200.json valora/ops/tables/
#   SHA=<tree> OUT=... bash bench/ops/retune_rank_major_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"
TABLE=valora/ops/tables/NVIDIA_H200.json
cp "$TABLE" "$R/shipped.json"
cp "$TABLE" "$R/NVIDIA_H200.json"
VALORA_LORA_B_LAYOUT=rank timeout 280 python3 -m valora.ops.tuning --tokens 64,256,1024 \
  --ranks 16,64 --no-resume --out "$R/NVIDIA_H200.json" --time-budget 250 2>&1 \
  | tr '\r' '\n' | tail -n 5 > "$R/tune_log.txt"
cp "$R/NVIDIA_H200.json" "$TABLE"
timeout 260 python3 bench/ops/bench_lora_ops.py --out "$R/lora_ops.jsonl" --time-budget 230 \
  --sha "$SHA-retuned" > "$R/bench.log" 2>&1
cp "$R/shipped.json" "$TABLE"
cat "$R/tune_log.txt"; tail -n 3 "$R/bench.log"; wc -l "$R/lora_ops.jsonl"
