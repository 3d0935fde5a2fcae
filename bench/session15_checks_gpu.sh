#!/usr/bin/env bash
# Device call of session 15 (≈ 8 min): the LoRA expand in the skinny GEMM's reduction loop
# (bench/ops/gemm_expand.py, with and without a programmatic dependent launch behind the shrink);
# the GPU tests at the session-14 review mends (tests/gpu, the merge tests, tests/ops -m gpu); an
# engine start with an empty Triton cache (few-adapter captures included).
# Results in $OUT/results.tgz.     SHA=<tree> OUT=... bash bench/session15_checks_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{ge,tests,start}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
PYTHONPATH=$PWD:$PWD/bench/ops timeout 200 python3 bench/ops/gemm_expand.py \
  --out "$R/ge/gemm_expand.jsonl" --sha "$SHA" > "$R/ge/log.txt" 2>&1
echo "gemm_expand exit $?" >> "$R/ge/log.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider --durations=5 -m "gpu or not gpu" tests/gpu \
  tests/orchestrator/test_merge_gpu.py > "$R/tests/tests_gpu_merge.log" 2>&1
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops > "$R/tests/ops_gpu.log" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7b > /dev/null
TRITON_CACHE_DIR=$(mktemp -d) timeout 90 python3 bench/model/engine_start_gpu.py --model /tmp/m7b \
  > "$R/start/log.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 16 "$R/ge/log.txt"
tail -n 2 "$R/tests/tests_gpu_merge.log" "$R/tests/ops_gpu.log"
grep -E "decode graphs|built in" "$R/start/log.txt" | cut -c1-300; tail -n 2 "$R/start/log.txt"
