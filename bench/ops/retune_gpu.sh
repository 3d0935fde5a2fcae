#!/usr/bin/env bash
# One device call (<= 9.5 min) after the 2026-11-29 kernel changes (unrolled split-K sum in the
# expand, cold-L2 tuning, grouped merge kernel): GPU op tests, then a re-tune of the decode-size
# buckets of the H200 table (every power of two up to 256 tokens; storage rank 64, 128, 16, each
# time-boxed; the table is copied out after each). Run from the repository root with OUT set;
# afterwards:
#   cp $files_at/NVIDIA_H200.json valora/ops/tables/
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if [[ -z "${SKIP_TESTS:-}" ]]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/ops tests/orchestrator/test_merge_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1; tail -n 3 "$OUT/gpu_tests.log"
fi
# STEPS_SPEC="seconds:rank:tokens ..." (tokens comma-separated; default tokens: 1..256) replaces
# the default steps, e.g. STEPS_SPEC="90:32 120:16:1024,4096" (rank-32 buckets serve batches whose
# largest adapter rank is 17..32, since tiles follow the effective rank).
tune() {
  # RESUME=1 keeps buckets already in the table (finishes a time-boxed step); LAYERS as the tuner's.
  timeout --kill-after=5 "$1" python3 -m valora.ops.tuning $([[ -n "${RESUME:-}" ]] || echo --no-resume) \
    --layers "${LAYERS:-q,qkv,gate_up,down}" --tokens "${3:-1,2,4,8,16,32,64,128,256}" --ranks "$2" --time-budget "$(( $1 - 15 ))" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 3
}
STEPS=("${TUNE_S1:-200} 64" "${TUNE_S2:-120} 128" "${TUNE_S3:-90} 16")
if [[ -n "${STEPS_SPEC:-}" ]]; then
  STEPS=(); for spec in $STEPS_SPEC; do STEPS+=("${spec//:/ }"); done
fi
for step in "${STEPS[@]}"; do
  tune $step | tee -a "$OUT/tune.log"
  cp valora/ops/tables/NVIDIA_H200.json "$OUT/"
done
# GRID_S=<seconds>: then the operator grid against vLLM (carry .peers) with the new table.
if [[ -n "${GRID_S:-}" ]]; then
  SHA=${SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
  timeout $(( GRID_S + 20 )) python3 bench/ops/bench_lora_ops.py --out "$OUT/lora_ops.jsonl" --sha "$SHA" \
    --time-budget "$GRID_S" > "$OUT/ops_bench.log" 2>&1
  tail -n 8 "$OUT/ops_bench.log"
fi
