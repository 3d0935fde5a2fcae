#!/usr/bin/env bash
# One device call (session 10): tune the mix entries (tiles for CUDA-graph replays, whose slots the
# host does not know) at decode sizes for storage rank 64 and 32 slots, then the decode benchmark
# with them (the engine's defaults). The table comes back in $OUT/results.tgz.
#   SHA=<tree> OUT=... bash bench/model/mix_tiles_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{tune,decode}
timeout 330 python3 -m valora.ops.tuning --mix --tokens 32,8,16,64,128 --ranks 64 --adapters 32 \
  --time-budget 300 > "$R/tune/log.txt" 2>&1
cp valora/ops/tables/NVIDIA_H200.json "$R/tune/NVIDIA_H200.json"
timeout 200 python3 bench/model/bench_decode.py --out "$R/decode" --layers fused --skip-hf \
  --batches 1,8,32 --sha "$SHA" > "$R/decode/log.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== tune"; tail -c 400 /tmp/v/tune/log.txt; grep -c '"mix:' /tmp/v/tune/NVIDIA_H200.json
echo "== decode"; sed -n '/^## Bars/,/^## Prefill/p' /tmp/v/decode/summary.md 2>/dev/null | head -n 30 || tail -n 20 /tmp/v/decode/log.txt
