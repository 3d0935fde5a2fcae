#!/usr/bin/env bash
# One device call (session 10): async output processing on vs off in one 7B-shaped engine
# (bench/model/async_outputs_gpu.py), and the decode anatomy with the step's adapters known on the
# host (path `known`: table tiles of the adapters' own ranks) beside the graph's worst-case tiles.
#   SHA=<tree> OUT=... bash bench/model/async_known_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{async,anatomy}
python3 bench/orchestrator/make_model_dir.py --out /tmp/ab-model > /dev/null
timeout 330 python3 bench/model/async_outputs_gpu.py --model /tmp/ab-model --out "$R/async" \
  --sha "$SHA" > "$R/async/log.txt" 2>&1
timeout 150 python3 bench/model/decode_anatomy.py --out "$R/anatomy" --batches 32 \
  --layers fused_kv --sha "$SHA" > "$R/anatomy/log.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== async"; tail -n 8 /tmp/v/async/log.txt
echo "== anatomy"; tail -n 10 /tmp/v/anatomy/log.txt
