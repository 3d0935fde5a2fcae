#!/usr/bin/env bash
# One device call (session 13): the base projections on the Triton skinny GEMM (the default from
# this commit, up to 32 rows) against cuBLAS (`cublas_base`) and against the skinny GEMM with the
# LoRA deltas in series (`serial`), decode steps of the 7B model benchmark in one process; then
# the skinny GEMM's GPU tests and tests/gpu. Results in $OUT/results.tgz.
#   SHA=<tree> OUT=... bash bench/model/skinny_gemm_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{decode,tests}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_skinny_gemm.py \
  > "$R/tests/skinny_gpu.log" 2>&1
timeout 280 python3 bench/model/bench_decode.py --out "$R/decode" --skip-hf \
  --layers fused,cublas_base,serial --batches "${BATCHES:-8,32}" --sha "$SHA" \
  > "$R/decode/log.txt" 2>&1
if [[ -n "${TESTS:-}" ]]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/gpu \
    > "$R/tests/tests_gpu.log" 2>&1
fi
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
rm -rf /tmp/v && mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
for f in /tmp/v/tests/*.log; do echo "== $f"; tail -n 1 "$f"; done
grep -E "^\| (fused|cublas_base|serial) \|" /tmp/v/decode/summary.md 2>/dev/null || tail -n 8 /tmp/v/decode/log.txt
