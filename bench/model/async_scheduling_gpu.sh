#!/usr/bin/env bash
# Next device session (written in session 16, not run): asynchronous scheduling on the GPU.
# 1. Its GPU tests: tests/gpu/test_engine_cuda.py (the CUDA engine with async scheduling against
#    the CPU's greedy tokens; the bf16 logits recorder now wraps sampler.launch_sample) and the
#    CUDA-graph tests.
# 2. The A/B: bench/model/async_outputs_gpu.py --mode scheduling — one 7B-shaped engine (dummy
#    weights, decode graphs), 32 / 64 greedy requests of 128 tokens, base and 8 adapters, the
#    switch flipped between alternating runs. Predicted: steps shorter by most of the host's
#    per-step work (≈ 0.5–1.7 ms at 16–64 rows on the CPU machine's Python,
#    bench/results/model/engine_host_overhead_cpu.txt) where the device step is longer than it.
#    If it wins, make it the default (SchedulerConfig.async_scheduling) and run the serving A/B
#    (OUT=$OUT FLAG=async-scheduling bash bench/orchestrator/piecewise_ab.sh). ≈ 6 min.
#   SHA=<tree> OUT=... bash bench/model/async_scheduling_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{async,tests}
timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/gpu/test_engine_cuda.py tests/gpu/test_cuda_graph.py > "$R/tests/engine_graph.log" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/ab-model > /dev/null
timeout 330 python3 bench/model/async_outputs_gpu.py --model /tmp/ab-model --out "$R/async" \
  --mode scheduling --sha "$SHA" > "$R/async/log.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" .
tail -n 1 "$R/tests/engine_graph.log"
tail -n 6 "$R/async/log.txt"
