#!/usr/bin/env bash
# Device call of session 14 (≈ 5 min): the skinny GEMM's tuned table entries against its heuristic
# tiles and cuBLAS in one process (bench_decode labels fused / skinny_untuned / cublas_base,
# batches 1-32, no HF), the GPU tests of the skinny GEMM and the engine, the engine start with an
# empty Triton cache (the M-specialised skinny binaries). Results in $OUT/results.tgz.
#   SHA=<tree> OUT=... bash bench/model/skinny_ab_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{decode,tests,start}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/ops/test_skinny_gemm.py \
  tests/gpu/test_cuda_graph.py tests/gpu/test_engine_cuda.py > "$R/tests/tests.log" 2>&1
timeout 240 python3 bench/model/bench_decode.py --out "$R/decode" --skip-hf \
  --layers fused,skinny_untuned,cublas_base --batches 1,8,16,32 --sha "$SHA" > "$R/decode/log.txt" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7b > /dev/null
TRITON_CACHE_DIR=$(mktemp -d) timeout 120 python3 bench/model/engine_start_gpu.py --model /tmp/m7b \
  > "$R/start/log.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 2 "$R/tests/tests.log"
grep -E "^\| (fused|skinny_untuned|cublas_base) \|" "$R/decode/summary.md" || tail -n 8 "$R/decode/log.txt"
grep -E "skinny GEMM binaries|built in" "$R/start/log.txt" | cut -c1-220
