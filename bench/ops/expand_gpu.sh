#!/usr/bin/env bash
# One device call (<= ~9 min on an H200, each step time-boxed):
#   1. bench/ops/expand_variants.py: the expand's tiles, late vs early y load, at the floor-bar
#      shapes and the decode bucket, with three copy ceilings                      (<= 230 s)
#   2. the early-y and rank-tail op tests on the GPU, then the GPU tests of the session-8 work
#      never run on a GPU (pieces writing into their buffers, threaded LoRA warm-up in the
#      engine), attention backends, fused layers                                    (<= 250 s)
#   OUT=$OUT SHA=<tree> bash bench/ops/expand_gpu.sh
# Files under $OUT: gpu.txt expand_variants.jsonl expand_variants.log gpu_tests.log
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt"
timeout -s INT 230 python3 bench/ops/expand_variants.py --out "$OUT/expand_variants.jsonl" \
  --sha "$SHA" --budget 200 > "$OUT/expand_variants.log" 2>&1
timeout -s INT 40 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/ops/test_expand_early_y.py tests/ops/test_expand_rank_tail.py > "$OUT/gpu_tests.log" 2>&1
timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/gpu/test_piecewise_graphs.py tests/gpu/test_engine_cuda.py \
  tests/gpu/test_attention_triton.py -o log_cli=true --log-cli-level=INFO >> "$OUT/gpu_tests.log" 2>&1
timeout -s INT 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_fused_layers.py \
  >> "$OUT/gpu_tests.log" 2>&1
echo "== GPU tests"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | grep -E "^[0-9]+ |=====" | tail -n 4
grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head
grep -oE "compiled [0-9]+ LoRA kernel variants in [0-9.]+ s[^\"]*" "$OUT/gpu_tests.log" | head -n 3
echo "== expand variants"; cat "$OUT/expand_variants.log" | cut -c1-330
