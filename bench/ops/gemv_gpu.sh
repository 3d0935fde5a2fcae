#!/usr/bin/env bash
# One device call (session 11): GEMV-style decode expand and shrink (no tl.dot) against the
# shipped kernels at the decode step (bench/ops/expand_gemv.py, bench/ops/shrink_gemv.py).
#   SHA=<tree> OUT=... bash bench/ops/gemv_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 200 python3 bench/ops/expand_gemv.py --out "$R/expand_gemv.jsonl" --sha "$SHA" \
  > "$R/expand_gemv.log" 2>&1
timeout 200 python3 bench/ops/shrink_gemv.py --out "$R/shrink_gemv.jsonl" --sha "$SHA" \
  > "$R/shrink_gemv.log" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== expand"; cat /tmp/v/expand_gemv.log | cut -c1-400
echo "== shrink"; cat /tmp/v/shrink_gemv.log | cut -c1-400
