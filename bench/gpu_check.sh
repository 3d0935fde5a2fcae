#!/usr/bin/env bash
# One device call (<= ~9.8 min; tests/gpu needs ~150 s now) after kernel / layer changes: GPU tests, the decode benchmark
# (engine defaults vs LoRA never overlapped, HF + PEFT at batch 32) and the operator grid against
# vLLM (carry .peers). Run from the repository root on the GPU machine with OUT set; everything
# lands in $OUT/results.tgz plus the two JSONL files, short tables print last. Afterwards, here:
#   tar -xzf $files_at/results.tgz -C <dir>; cp $files_at/lora_ops.jsonl bench/results/ops/...
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
R=$OUT/r && mkdir -p "$R"/{tests,decode}
OUT=$R/tests BUDGET_S=${TESTS_S:-140} bash tests/gpu/run_gpu_tests.sh > "$R/tests/summary.txt" 2>&1
timeout -s INT 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/layers \
  tests/orchestrator/test_merge_gpu.py > "$R/tests/ops_layers.log" 2>&1
# Unmarked kernel tests that take the GPU when there is one (effective-rank tiles).
timeout -s INT 40 python3 -m pytest -q -p no:cacheprovider tests/ops/test_effective_rank.py \
  >> "$R/tests/ops_layers.log" 2>&1
timeout 170 python3 bench/model/bench_decode.py --out "$R/decode" --hf-batches 32 \
  --layers fused,serial --sha "$SHA" > "$R/decode/log.txt" 2>&1
timeout 140 python3 bench/ops/bench_lora_ops.py --out "$OUT/lora_ops.jsonl" --sha "$SHA" \
  --time-budget "${OPS_BUDGET:-120}" > "$R/ops_bench.log" 2>&1
tar -C "$R" -czf "$OUT/results.tgz" . && rm -rf "$R"
mkdir -p /tmp/v && tar -C /tmp/v -xzf "$OUT/results.tgz"
echo "== tests/gpu";  tail -n 6 /tmp/v/tests/summary.txt
echo "== ops+layers+merge (gpu)"; grep -E "FAILED|ERROR" /tmp/v/tests/ops_layers.log | head; grep -E "passed|failed" /tmp/v/tests/ops_layers.log
echo "== ops bench"; tail -n 6 /tmp/v/ops_bench.log
echo "== decode"; sed -n '/^## Bars/,/^## valora/p' /tmp/v/decode/summary.md 2>/dev/null || tail -n 20 /tmp/v/decode/log.txt
grep -E "^\| (fused|serial) \| (one_adapter_r16|mixed32_ranks|mixed8_r16) \| (1|8|32) " /tmp/v/decode/summary.md
