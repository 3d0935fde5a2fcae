#!/usr/bin/env bash
# One device call (session 11): the decode expand with the whole storage rank in one chunk (the B
# tail masked at the rank rounded up to 8) and an early y load, beside every earlier candidate
# (bench/ops/decode_tiles.py --expand-only); the multi-tile expands of bench/ops/expand_layout.py;
# the GPU op tests; tests/gpu (graph capture after the session-10 refactor).
#   SHA=<tree> OUT=... bash bench/ops/whole_rank_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{tiles,layout,ops,tests}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 150 python3 bench/ops/decode_tiles.py --expand-only --out "$R/tiles/decode_tiles.jsonl" \
  --sha "$SHA" --budget 120 > "$R/tiles/log.txt" 2>&1
timeout 110 python3 bench/ops/expand_layout.py --out "$R/layout/expand_layout.jsonl" --sha "$SHA" \
  > "$R/layout/log.txt" 2>&1
timeout -s INT 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops \
  > "$R/ops/gpu_tests.log" 2>&1
OUT=$R/tests BUDGET_S=${TESTS_S:-150} bash tests/gpu/run_gpu_tests.sh > "$R/tests/summary.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== ops tests"; tail -n 3 /tmp/v/ops/gpu_tests.log
echo "== tests/gpu"; tail -n 6 /tmp/v/tests/summary.txt
echo "== layout"; tail -n 16 /tmp/v/layout/log.txt
echo "== tiles"; sed -n '/^scenario /,$p' /tmp/v/tiles/log.txt
