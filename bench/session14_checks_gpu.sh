#!/usr/bin/env bash
# Device call of session 14 (≈ 7 min): what sessions 12-13 built and never ran on a GPU, at the
# rank-major `B` + skinny-GEMM defaults:
#  1) bench/ops/gemm_shrink.py (the LoRA shrink as extra programs of the skinny GEMM's launch);
#  2) the GPU tests: tests/gpu, tests/ops -m gpu, tests/orchestrator/test_merge_gpu.py;
#  3) the switch benchmark (merge / unmerge with the rank-major slot storage);
#  4) the engine start with an empty Triton cache (skinny warm-up, M-unspecialised kernel).
# Results in $OUT/results.tgz.     SHA=<tree> OUT=... bash bench/session14_checks_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{shrink,tests,switch,start}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
PYTHONPATH=$PWD:$PWD/bench/ops timeout 150 python3 bench/ops/gemm_shrink.py \
  --out "$R/shrink/gemm_shrink.jsonl" --sha "$SHA" > "$R/shrink/log.txt" 2>&1
echo "gemm_shrink exit $?" >> "$R/shrink/log.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider --durations=5 -m "gpu or not gpu" tests/gpu \
  tests/orchestrator/test_merge_gpu.py > "$R/tests/tests_gpu_merge.log" 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops > "$R/tests/ops_gpu.log" 2>&1
timeout 90 python3 bench/orchestrator/bench_switch.py --out "$R/switch" > "$R/switch/log.txt" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7b > /dev/null
TRITON_CACHE_DIR=$(mktemp -d) timeout 150 python3 bench/model/engine_start_gpu.py --model /tmp/m7b \
  > "$R/start/log.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 14 "$R/shrink/log.txt"
tail -n 2 "$R/tests/tests_gpu_merge.log" "$R/tests/ops_gpu.log"
tail -n 12 "$R/switch/log.txt"
tail -n 2 "$R/start/log.txt"
