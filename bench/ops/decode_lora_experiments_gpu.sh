#!/usr/bin/env bash
# Next device session (written in session 16, not run): the two decode-LoRA experiments aimed at
# the 32-adapter bar, one call (≈ 5 min): bench/ops/persistent_expand.py (the expand as a
# persistent, software-pipelined loop over work items) and bench/ops/gemm_chunks.py (the expand in
# the skinny GEMM's reduction over a flat per-step chunk list). Each checks its outputs against
# the shipped path first and prints per-decode-step sums last (bench/ops/NOTES.md, session 16).
#   SHA=<tree> OUT=... bash bench/ops/decode_lora_experiments_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/bench/ops
SHA=${SHA:-unknown}
mkdir -p "$OUT"
timeout 280 python3 bench/ops/persistent_expand.py --out "$OUT/persistent_expand.jsonl" \
  --sha "$SHA" > "$OUT/persistent_expand.log" 2>&1
timeout 280 python3 bench/ops/gemm_chunks.py --out "$OUT/gemm_chunks.jsonl" --sha "$SHA" \
  > "$OUT/gemm_chunks.log" 2>&1
tail -n 2 "$OUT/persistent_expand.log" "$OUT/gemm_chunks.log"
