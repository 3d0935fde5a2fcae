#!/usr/bin/env bash
# Session 16: the skinny GEMM's grid capped beside an overlapped LoRA op
# (VALORA_SKINNY_OVERLAP_PROGRAMS; valora/ops/skinny_gemm.py, skinny_overlap_programs). At batch
# 8-32 a 7B projection's skinny GEMM has 128-384 programs, all resident at once and long, so the
# side stream's shrink / expand wait for SM room until the GEMM drains (bench/ops/NOTES.md,
# session 14: "the skinny GEMM starves the overlapped LoRA op"). Predicted: a grid of <= 1-2
# programs an SM, each walking several column blocks, leaves room for the LoRA kernels beside it
# and takes part of the LoRA's ~2.5 ms a step (32 adapters, batch 32) off the critical path, if
# the GEMM keeps its bandwidth on fewer programs. One process, engine defaults vs caps of
# 66 / 132 / 198 / 264 programs, batches 1 / 8 / 32, no HF; then the skinny GEMM's GPU tests
# (the capped grid at 7B widths). ~4 min.
#   SHA=<tree> OUT=... bash bench/model/skinny_cap_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"/{decode,tests}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > "$R/gpu.txt"
timeout 330 python3 bench/model/bench_decode.py --out "$R/decode" --skip-hf \
  --layers fused,skinny_cap66,skinny_cap132,skinny_cap198,skinny_cap264 --batches 1,8,32 \
  --sha "$SHA" > "$R/decode/log.txt" 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/ops/test_skinny_gemm.py > "$R/tests/skinny.log" 2>&1
tar czf "$OUT/results.tgz" -C "$R" .
tail -n 1 "$R/tests/skinny.log"
grep -E "^\| (fused|skinny_cap[0-9]+) \| (base|one_adapter_r16|mixed8_r16|mixed32_ranks) \|" \
  "$R/decode/summary.md" || tail -n 8 "$R/decode/log.txt"
