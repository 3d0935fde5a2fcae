#!/usr/bin/env bash
# One device call (~6 min on an H200) for LoRAConfig.fuse_correction, before turning it on by
# default: the fused-correction op tests on the GPU (real Triton kernels), the graph-runner tests
# incl. the captured fused `mixed` graph, bench/ops/bench_correction.py (fused vs two ops at 7B
# shapes, GPU time under CUDA graphs + host time) and bench/model/eager_anatomy.py (7B eager
# steps, mixed ones also fused). Run from the repository root with OUT set:
#   OUT=$OUT bash bench/fused_correction_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
timeout -s INT 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_lora_correction.py \
  tests/ops/test_warmup.py > "$OUT/correction_tests.log" 2>&1
timeout -s INT 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/gpu/test_cuda_graph.py >> "$OUT/correction_tests.log" 2>&1
timeout 150 python3 bench/ops/bench_correction.py --out "$OUT/correction.jsonl" --sha "$SHA" \
  > "$OUT/correction_bench.log" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7 > /dev/null && timeout 170 \
  python3 bench/model/eager_anatomy.py --model /tmp/m7 --out "$OUT" --tokens 128,512 --sha "$SHA" \
  > "$OUT/anatomy.log" 2>&1
echo "== tests"; grep -E "FAILED|ERROR|passed|failed" "$OUT/correction_tests.log" | tail -n 12
echo "== fused vs two ops (GPU µs under graphs; host µs)"; tail -n 25 "$OUT/correction_bench.log"
echo "== eager steps (7B)"; grep -E "^step" "$OUT/anatomy.log"
