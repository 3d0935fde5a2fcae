#!/usr/bin/env bash
# One device call (~8 min on an H200) for what session 7 built without a GPU: the expand's
# unmasked rank tail (GPU op tests + the operator grid against vLLM, carry .peers), the
# vision-tower graphs (their GPU test, the engine-on-CUDA tests that now capture them, and
# bench/model/vision_graphs_bench.py at 7B shapes), and everything else in tests/gpu.
#   OUT=$OUT SHA=<tree> bash bench/gpu_validation.sh        (device tool: carry [".peers"])
# Files under $OUT (≤ 8): gpu_tests.log ops_tests.log vision_graphs.jsonl vision.log
#   lora_ops.jsonl ops_bench.log
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
timeout -s INT 200 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/gpu \
  > "$OUT/gpu_tests.log" 2>&1
timeout -s INT 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops \
  tests/ops/test_expand_rank_tail.py > "$OUT/ops_tests.log" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7 > /dev/null && timeout 90 \
  python3 bench/model/vision_graphs_bench.py --model /tmp/m7 --out "$OUT" --sha "$SHA" \
  > "$OUT/vision.log" 2>&1
timeout 150 python3 bench/ops/bench_lora_ops.py --out "$OUT/lora_ops.jsonl" --sha "$SHA" \
  --time-budget 120 > "$OUT/ops_bench.log" 2>&1
echo "== tests/gpu"; tail -n 2 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head
echo "== GPU op tests"; tail -n 1 "$OUT/ops_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/ops_tests.log" | head
echo "== vision tower (7B shapes)"; tail -n 4 "$OUT/vision.log"
echo "== operator grid vs vLLM"; tail -n 12 "$OUT/ops_bench.log"
