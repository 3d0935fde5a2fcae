#!/usr/bin/env bash
# One device call (session 10): tests/gpu with the session-10 defaults (async output processing,
# one-launch K/V write), then the decode tile sweep (bench/ops/decode_tiles.py).
#   SHA=<tree> OUT=... bash bench/ops/decode_tiles_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{tests,tiles}
OUT=$R/tests BUDGET_S=170 bash tests/gpu/run_gpu_tests.sh > "$R/tests/summary.txt" 2>&1
timeout 330 python3 bench/ops/decode_tiles.py --out "$R/tiles/decode_tiles.jsonl" --sha "$SHA" \
  --budget 300 > "$R/tiles/log.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== tests/gpu"; tail -n 6 /tmp/v/tests/summary.txt
echo "== tiles"; sed -n '/^scenario /,$p' /tmp/v/tiles/log.txt
