#!/usr/bin/env bash
# One device call (session 10): more mix entries — 256 tokens at storage rank 64 (piecewise
# prefill pieces of 129–256 tokens) and 8–128 tokens at storage ranks 16 and 32 (engines started
# with --max-lora-rank 16 / 32). The table comes back in $OUT/results.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r && mkdir -p "$R"
timeout 120 python3 -m valora.ops.tuning --mix --tokens 256 --ranks 64 --adapters 32 \
  --time-budget 100 > "$R/tune_r64.log" 2>&1
timeout 400 python3 -m valora.ops.tuning --mix --tokens 32,8,16,64,128 --ranks 16,32 \
  --adapters 32 --time-budget 380 > "$R/tune_r16_r32.log" 2>&1
cp valora/ops/tables/NVIDIA_H200.json "$R/NVIDIA_H200.json"
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
for f in /tmp/v/*.log; do echo "== $f"; tail -c 300 "$f"; echo; done
grep -c '"mix:' /tmp/v/NVIDIA_H200.json
