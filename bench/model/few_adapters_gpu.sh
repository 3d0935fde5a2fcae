#!/usr/bin/env bash
# Device call of session 14 (≈ 4 min): the few-adapter decode captures (the LoRA graphs of
# buckets 8 / 16 captured again with the base GEMM on cuBLAS, replayed for ≤ 8 adapters) against
# the skinny GEMM in every LoRA graph (`few_off`) and cuBLAS everywhere (`cublas_base`), one
# process, batches 1-32, no HF; the graph / engine GPU tests; the engine start's log line.
#   SHA=<tree> OUT=... bash bench/model/few_adapters_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{decode,tests,start}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/gpu/test_cuda_graph.py \
  tests/gpu/test_engine_cuda.py > "$R/tests/tests.log" 2>&1
timeout 200 python3 bench/model/bench_decode.py --out "$R/decode" --skip-hf \
  --layers fused,few_off,cublas_base --batches 1,8,16,32 --sha "$SHA" > "$R/decode/log.txt" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7b > /dev/null
timeout 100 python3 bench/model/engine_start_gpu.py --model /tmp/m7b > "$R/start/log.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 2 "$R/tests/tests.log"
grep -E "^\| (fused|few_off|cublas_base) \|" "$R/decode/summary.md" || tail -n 8 "$R/decode/log.txt"
grep -E "decode graphs|built in" "$R/start/log.txt" | cut -c1-300
