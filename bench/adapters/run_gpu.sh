#!/usr/bin/env bash
# One device call for issue 7: first the head-vs-decode latency benchmark at LLaVA-1.5-7B shapes
# with dummy weights (< 60 s; HEADS_ONLY=1 stops after it), then the full build of
# examples/adapters/vision_tasks.toml on the GPU (`valora adapters build --device cuda --jobs 4`:
# the four single-task adapters train in four processes at once, then packing runs in one).
# Run from the repository root on the GPU machine with OUT set, carrying build/fashion-mnist
# (a copy of the Debian package dataset-fashion-mnist's files, made here with `mkdir -p build/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
# build/fashion-mnist/`). Budget: build <= BUILD_BUDGET s (default 300; the build is resumable,
# so a cut-off build still returns its finished steps), benchmark <= 90 s.
# Files under $OUT (flat): vision_tasks.tar.gz (the whole output directory), report.md,
# report.json, report.png, manifest.json, build.log, head_vs_decode_h200.jsonl, heads_summary.md.
# Afterwards, here:
#   mkdir -p build && tar -C build -xzf $files_at/vision_tasks.tar.gz
#   cp $files_at/{report.md,report.json,report.png,manifest.json} bench/results/adapters/
#   cat $files_at/head_vs_decode_h200.jsonl >> bench/results/heads/head_vs_decode.jsonl
#   python3 bench/adapters/bundle.py build/vision_tasks_gpu
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE
[ -d build/fashion-mnist ] && export VALORA_FASHION_MNIST_DIR=$PWD/build/fashion-mnist
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# 1. Head vs decode at 7B shapes (< 60 s).
timeout 90 python3 bench/heads/bench_head_vs_decode.py --dummy-config bench/model/llava-1.5-7b \
  --repeats 20 --out "$OUT/heads" 2>&1 | grep -v -i warn | tail -4
[ -f "$OUT/heads/head_vs_decode.jsonl" ] && mv "$OUT/heads/head_vs_decode.jsonl" "$OUT/head_vs_decode_h200.jsonl"
[ -f "$OUT/heads/summary.md" ] && mv "$OUT/heads/summary.md" "$OUT/heads_summary.md"
rmdir "$OUT/heads" 2>/dev/null
[ "${HEADS_ONLY:-0}" = 1 ] && exit 0
# 2. The adapter build.
out=build/vision_tasks_gpu
timeout "${BUILD_BUDGET:-300}" python3 -m valora.training.cli build \
  examples/adapters/vision_tasks.toml --out "$out" --device cuda --jobs 4 --threads 4 2>&1 \
  | tr '\r' '\n' | grep -v -E '^\s*$|it/s\]$|s/it\]$' > "$OUT/build.log"
echo "build exit status: ${PIPESTATUS[0]} (0: every task met; 1: some missed; 124: cut at budget)"
tar -C build -czf "$OUT/vision_tasks.tar.gz" --exclude='*.partial' vision_tasks_gpu
for f in report.md report.json report.png manifest.json; do
  [ -f "$out/$f" ] && cp "$out/$f" "$OUT/$f"
done
tail -4 "$OUT/build.log"
[ -f "$out/report.md" ] && sed -n '/^| task/,/^$/p' "$out/report.md"
