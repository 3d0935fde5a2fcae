#!/usr/bin/env bash
# One device call (session 13): the rank-major `B` layout (VALORA_LORA_B_LAYOUT=rank) with its own
# mix entries. 1) re-tune the mix entries (tiles of graph-replayed decode calls) at decode sizes
# for storage rank 64 / 32 slots with the layout set, into a copy of the shipped table;
# 2) the decode benchmark with the shipped layout and table; 3) the same with the rank-major
# layout and its re-tuned table (two processes, same card, same call). Results in $OUT/results.tgz.
#   SHA=<tree> OUT=... bash bench/model/rank_major_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
BATCHES=${BATCHES:-8,32,64}
TOKENS=${TOKENS:-32,8,16,64}
R=$OUT/r && mkdir -p "$R"/{tune,column,rank}
TABLE=valora/ops/tables/NVIDIA_H200.json
cp "$TABLE" "$R/tune/column.json" && cp "$TABLE" "$R/tune/rank.json"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
VALORA_LORA_B_LAYOUT=rank timeout 200 python3 -m valora.ops.tuning --mix --no-resume \
  --tokens "$TOKENS" --ranks 64 --adapters 32 --out "$R/tune/rank.json" --time-budget 180 \
  2>&1 | tr '\r' '\n' | grep -v "s/bucket\]$" > "$R/tune/log.txt"
timeout 170 python3 bench/model/bench_decode.py --out "$R/column" --layers fused --skip-hf \
  --batches "$BATCHES" --sha "$SHA-column" > "$R/column/log.txt" 2>&1
cp "$R/tune/rank.json" "$TABLE"
VALORA_LORA_B_LAYOUT=rank timeout 170 python3 bench/model/bench_decode.py --out "$R/rank" \
  --layers fused --skip-hf --batches "$BATCHES" --sha "$SHA-rank" > "$R/rank/log.txt" 2>&1
cp "$R/tune/column.json" "$TABLE"
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== tune"; tail -n 3 /tmp/v/tune/log.txt
for l in column rank; do
  echo "== $l"; grep -E "^\| (fused|mode)" /tmp/v/$l/summary.md 2>/dev/null | head -n 20 \
    || tail -n 8 /tmp/v/$l/log.txt
done
