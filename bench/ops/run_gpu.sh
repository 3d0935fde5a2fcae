#!/usr/bin/env bash
# One device call for issue 3: GPU tests, a time-boxed tuning of the H200 table, the operator
# benchmark. Run from the repository root on the GPU machine with OUT set (the device tool sets
# it), carrying .peers (vLLM kernels from shared/peers/vllm_lora/extract.sh) and .whl (pytest
# wheels, only needed where pytest is missing). ~8 minutes. Afterwards, here:
#   cp $files_at/lora_ops.jsonl bench/results/ops/lora_ops_h200.jsonl
#   cp $files_at/NVIDIA_H200.json valora/ops/tables/
#   python bench/ops/summarize_lora_ops.py bench/results/ops/lora_ops_h200.jsonl \
#       --markdown bench/results/ops/summary.md --plot bench/results/ops/lora_ops.png
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    .whl/pytest-8.3.4-*.whl .whl/pluggy-1.5.0-*.whl .whl/iniconfig-2.0.0-*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
# Smoke first: every tile candidate and graph capture; stop early (saves device time) on failure.
python3 -m pytest tests/ops/test_ops_lora_gpu.py -m gpu -q -x -k "candidate or graph" \
  2>&1 | tee "$OUT/gpu_tests_smoke.log" || exit 1
python3 -m pytest tests/ops/test_ops_lora_gpu.py -m gpu -q -k "not candidate and not graph" \
  2>&1 | tee "$OUT/gpu_tests.log"
python3 -m valora.ops.tuning --time-budget "${TUNE_BUDGET:-140}" 2>&1 | tr '\r' '\n' \
  | tail -5 | tee "$OUT/tune.log"
cp valora/ops/tables/*.json "$OUT/" 2>/dev/null
python3 bench/ops/bench_lora_ops.py --out "$OUT/lora_ops.jsonl" \
  --time-budget "${BENCH_BUDGET:-200}" 2>&1 | tee "$OUT/bench.log" | tail -60
