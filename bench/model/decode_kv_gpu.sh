#!/usr/bin/env bash
# One device call (session 10): the GPU tests of the one-launch K/V write and the fused layers,
# the decode step's anatomy with and without it, the decode benchmark's fused vs fused_kv rows at
# batch 32, and the tuner for the rank-32 decode buckets still missing. Outputs in
# $OUT/results.tgz (the device tool brings back at most 8 files); short tables print last.
#   SHA=<tree> OUT=... bash bench/model/decode_kv_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{tests,anatomy,decode,tune}
timeout 110 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/layers/test_fused_kv_write.py tests/layers/test_fused_layers.py > "$R/tests/layers.log" 2>&1
timeout 150 python3 bench/model/decode_anatomy.py --out "$R/anatomy" --batches 1,32 \
  --layers fused,fused_kv --sha "$SHA" > "$R/anatomy/log.txt" 2>&1
timeout 200 python3 bench/model/bench_decode.py --out "$R/decode" --layers fused,fused_kv --skip-hf \
  --batches 32 --sha "$SHA" > "$R/decode/log.txt" 2>&1
cp valora/ops/tables/NVIDIA_H200.json "$R/tune/before.json"
timeout 80 python3 -m valora.ops.tuning --tokens 256 --ranks 32 --time-budget 70 \
  > "$R/tune/log.txt" 2>&1
cp valora/ops/tables/NVIDIA_H200.json "$R/tune/NVIDIA_H200.json"
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== tests"; grep -E "FAILED|Error" /tmp/v/tests/layers.log | head -n 8; tail -n 1 /tmp/v/tests/layers.log
echo "== tune"; tail -c 600 /tmp/v/tune/log.txt
echo "== decode"; sed -n '/^## Bars/,$p' /tmp/v/decode/summary.md 2>/dev/null | head -n 30 || tail -n 20 /tmp/v/decode/log.txt
echo "== anatomy"; tail -n 14 /tmp/v/anatomy/log.txt
