#!/usr/bin/env bash
# One device call (session 10): tests/gpu and the `gpu`-marked op / layer tests with the
# session's defaults and table (mix entries), then the decode anatomy at batch 32.
#   SHA=<tree> OUT=... bash bench/model/gpu_tests_anatomy.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{tests,anatomy}
OUT=$R/tests BUDGET_S=170 bash tests/gpu/run_gpu_tests.sh > "$R/tests/summary.txt" 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/layers \
  > "$R/tests/ops_layers_gpu.log" 2>&1
timeout 120 python3 bench/model/decode_anatomy.py --out "$R/anatomy" --batches 32 \
  --sha "$SHA" > "$R/anatomy/log.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== tests/gpu"; tail -n 3 /tmp/v/tests/summary.txt
echo "== ops/layers gpu"; grep -E "FAILED|ERROR" /tmp/v/tests/ops_layers_gpu.log | head -n 8; tail -n 1 /tmp/v/tests/ops_layers_gpu.log
echo "== anatomy"; tail -n 8 /tmp/v/anatomy/log.txt
