#!/usr/bin/env bash
# Next device session (written in session 15, not run): the LoRA deltas of o_proj / gate_up_proj
# / down_proj folded into the next op (VALORA_LORA_DELTA_FOLD; valora/layers/lora_overlap.py,
# "Deltas folded into the next op") against the default, one process, batches 1-32, no HF; then
# the overlap and fused-layer GPU tests and the engine's graph tests with the switch on. ≈ 4 min.
# If it wins: flip the default in lora_overlap.lora_delta_fold and re-run the decode bars.
#   SHA=<tree> OUT=... bash bench/model/delta_fold_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{decode,tests}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 220 python3 bench/model/bench_decode.py --out "$R/decode" --skip-hf \
  --layers delta_fold_off,delta_fold --batches 1,8,32 --sha "$SHA" > "$R/decode/log.txt" 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/layers/test_lora_overlap.py tests/layers/test_fused_silu_and_mul.py > "$R/tests/overlap.log" 2>&1
VALORA_LORA_DELTA_FOLD=1 timeout 150 python3 -m pytest -q -p no:cacheprovider \
  -m "gpu or not gpu" tests/gpu/test_cuda_graph.py tests/gpu/test_engine_cuda.py \
  > "$R/tests/graph_engine_delta_fold.log" 2>&1
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 1 "$R/tests/overlap.log" "$R/tests/graph_engine_delta_fold.log"
grep -E "^\| (delta_fold|delta_fold_off) \|" "$R/decode/summary.md" || tail -n 8 "$R/decode/log.txt"
