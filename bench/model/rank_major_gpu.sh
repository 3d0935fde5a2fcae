#!/usr/bin/env bash
# Device call(s) of session 13: the rank-major `B` layout (VALORA_LORA_B_LAYOUT=rank) against the
# column layout, each with mix entries (tiles of graph-replayed decode calls) tuned for it.
#  1) re-tune the mix entries at decode sizes (storage rank 64, 32 slots) for each layout in
#     RETUNE (default "rank"), into a copy of the shipped table; a layout not re-tuned here takes
#     TABLE_<layout> when set (a table tuned in an earlier call), else the shipped table;
#  2) the decode benchmark once per layout (two processes, same card, same call);
#  3) TESTS=1: the GPU tests (`tests/ops -m gpu`, `tests/gpu`) with the rank-major layout.
# Results in $OUT/results.tgz.
#   SHA=<tree> OUT=... [RETUNE="column rank"] [TABLE_rank=...] [TESTS=1] bash bench/model/rank_major_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
BATCHES=${BATCHES:-8,32,64}
TOKENS=${TOKENS:-32,8,16,64}
R=$OUT/r && mkdir -p "$R"/{tune,column,rank,tests}
TABLE=valora/ops/tables/NVIDIA_H200.json
cp "$TABLE" "$R/tune/shipped.json"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
for layout in column rank; do
  var=TABLE_$layout
  cp "${!var:-$TABLE}" "$R/tune/$layout.json"
done
for layout in ${RETUNE:-rank}; do
  VALORA_LORA_B_LAYOUT=$layout timeout 200 python3 -m valora.ops.tuning --mix --no-resume \
    --tokens "$TOKENS" --ranks 64 --adapters 32 --out "$R/tune/$layout.json" --time-budget 180 \
    > "$R/tune/log_$layout.txt" 2>&1
done
for layout in column rank; do
  cp "$R/tune/$layout.json" "$TABLE"
  VALORA_LORA_B_LAYOUT=$layout timeout 170 python3 bench/model/bench_decode.py \
    --out "$R/$layout" --layers fused --skip-hf --batches "$BATCHES" --sha "$SHA-$layout" \
    > "$R/$layout/log.txt" 2>&1
done
cp "$R/tune/shipped.json" "$TABLE"
if [[ -n "${TESTS:-}" ]]; then
  cp "$R/tune/rank.json" "$TABLE"
  export VALORA_LORA_B_LAYOUT=rank
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops > "$R/tests/ops_rank.log" 2>&1
  timeout 200 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/gpu \
    > "$R/tests/tests_gpu_rank.log" 2>&1
  cp "$R/tune/shipped.json" "$TABLE"
fi
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
for f in /tmp/v/tune/log_*.txt; do echo "== $f"; tr '\r' '\n' < "$f" | tail -n 2; done
for l in column rank; do
  echo "== $l"; grep -E "^\| fused" /tmp/v/$l/summary.md 2>/dev/null || tail -n 8 /tmp/v/$l/log.txt
done
for f in /tmp/v/tests/*.log; do echo "== $f"; tail -n 1 "$f"; done
