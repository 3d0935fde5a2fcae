#!/usr/bin/env bash
# One device call that re-measures everything the GPU path, the orchestrator's switch and the task
# heads need, after the changes of 2026-11-29 (run from the repository root on the GPU machine, OUT
# set by the device tool). Each step has its own time limit; every output lands in one archive,
# $OUT/results.tgz (the device tool brings back at most 8 files), and short tables print last.
#   1. tests/gpu (engine on CUDA vs the CPU engine, graphs, memory plan, kernels)      <= 120 s
#   2. merge-kernel, WeightSwitcher and fused-layer GPU tests                            <= 75 s
#   3. switch time at LLaVA-1.5-7B shapes vs PEFT (bench/orchestrator/bench_switch.py)   <= 90 s
#   4. decode / prefill benchmark vs HF + PEFT at batch 32 (bench/model/bench_decode.py) <= 160 s
#   5. head vs decode at 7B shapes (bench/adapters/run_gpu.sh, HEADS_ONLY=1)             <= 90 s
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/r && mkdir -p "$R"/{tests,switch,decode,heads}
OUT=$R/tests BUDGET_S=120 bash tests/gpu/run_gpu_tests.sh > "$R/tests/summary.txt" 2>&1
timeout 75 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/orchestrator/test_merge_gpu.py tests/ops/test_ops_merge_kernel.py tests/layers > "$R/tests/merge.log" 2>&1
timeout 90 python3 bench/orchestrator/bench_switch.py --out "$R/switch" > "$R/switch/log.txt" 2>&1
timeout 160 python3 bench/model/bench_decode.py --out "$R/decode" --hf-batches 32 --sha "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  > "$R/decode/log.txt" 2>&1
OUT=$R/heads HEADS_ONLY=1 timeout 90 bash bench/adapters/run_gpu.sh > "$R/heads/log.txt" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== 1. tests/gpu";  tail -n 12 /tmp/v/tests/summary.txt
echo "== 2. merge+layers"; grep -E "FAILED|passed|failed" /tmp/v/tests/merge.log | tail -n 8; tail -n 1 /tmp/v/tests/merge.log
echo "== 3. switch";     grep -E "^\| valora|^\| peft|floor \(" /tmp/v/switch/log.txt | tail -n 12
echo "== 5. heads";      tail -n 6 /tmp/v/heads/log.txt
echo "== 4. decode"; grep -A4 "^| layers | kernels" /tmp/v/decode/log.txt;     sed -n '/^## Bars/,/^## valora/p' /tmp/v/decode/summary.md 2>/dev/null || tail -n 20 /tmp/v/decode/log.txt
