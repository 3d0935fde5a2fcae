#!/usr/bin/env bash
# One device call (<= ~10 min on an H200, each step time-boxed) for the piecewise prefill graphs
# (valora/engine/piecewise_graphs.py), built without a GPU:
#   1. their GPU tests, the engine-on-CUDA tests (which capture them; the engine's LoRA
#      warm-up runs on worker threads there), the attention backends and fused layers writing
#      into given buffers                                                          (<= 210 s)
#   2. bench/model/piecewise_bench.py at LLaVA-1.5-7B shapes: eager vs piecewise    (<= 190 s)
#   3. `valora profile-modes` with prefill steps through the pieces (the refit)     (<= 150 s)
#   OUT=$OUT SHA=<tree> bash bench/piecewise_gpu.sh
# Files under $OUT (<= 8): gpu_tests.log piecewise.log piecewise_steps.jsonl profile.log
#   profile-samples.jsonl NVIDIA_H200.json
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
  tests/gpu/test_piecewise_graphs.py tests/gpu/test_engine_cuda.py \
  tests/gpu/test_attention_triton.py > "$OUT/gpu_tests.log" 2>&1
timeout -s INT 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/layers/test_fused_layers.py \
  >> "$OUT/gpu_tests.log" 2>&1
python3 bench/orchestrator/make_model_dir.py --out /tmp/m7 > /dev/null
timeout -s INT 190 python3 bench/model/piecewise_bench.py --model /tmp/m7 --out "$OUT" \
  --sha "$SHA" > "$OUT/piecewise.log" 2>&1
timeout -s INT 150 python3 -m valora.cli --log-level info profile-modes --model /tmp/m7 \
  --load-format dummy --repeats 2 --samples "$OUT/profile-samples.jsonl" > "$OUT/profile.log" 2>&1
cp valora/orchestrator/profiles/*.json "$OUT/" 2>/dev/null
echo "== GPU tests"; tail -n 2 "$OUT/gpu_tests.log"; grep -E "^FAILED|^ERROR" "$OUT/gpu_tests.log" | head
echo "== profile-modes"; grep -E "profiled|error|Error" "$OUT/profile.log" | tail -n 4
echo "== eager vs piecewise (7B shapes)"; grep -E "capture|T=|Error|error" "$OUT/piecewise.log" | tail -n 24
