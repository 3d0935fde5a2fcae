#!/usr/bin/env bash
# Re-tune the H200 table's regular buckets for the rank-major `B` layout (the default since
# session 13), resumably: `valora tune-kernels` without --no-resume re-tunes only the entries
# tuned on another layout (session 15), so each call continues where the last stopped. Session
# 15 re-tuned 61 of 608 (bench/ops/NOTES.md); at 5-20 s a bucket the rest is ≈ 40 device
# minutes. One call: TUNE_S seconds of tuning (default 420) on TOKENS / RANKS (default: the
# prefill sizes 128-16384 and ranks 16 / 64, where calls are frequent and the re-tune paid
# 1-3 %), then, with GRID=1, the 300-point grid (≈ 4 min; carry .peers, extracted with
# `extract.sh .peers/vllm`). Afterwards: cp $files_at/r/NVIDIA_H200.json valora/ops/tables/
# NO_RESUME=1 re-tunes the chosen buckets even where they are rank-major-tuned already: session
# 17's persistent expand (ExpandConfig.persistent) is a candidate only for buckets of >= 8192
# tokens, so `NO_RESUME=1 TOKENS=16384 RANKS=64,128` lets the table take it where it wins.
# ADAPTERS / LAYERS narrow the adapter counts (default 1,8,32,128) and layers (q,qkv,gate_up,
# down); TUNE_S=0 skips tuning (the grid alone). GRID_TOKENS=16384 runs only the grid's points of
# those token counts; with AB=1 it runs them once before tuning as well (the shipped table against
# the re-tuned one in the same call: $R/lora_ops_before.jsonl, $R/lora_ops.jsonl).
#   SHA=<tree> OUT=... [TUNE_S=...] [GRID=1] [NO_RESUME=1] [ADAPTERS=...] [LAYERS=...] \
#     [GRID_TOKENS=... [AB=1]] bash bench/ops/retune_rank_major_gpu.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
SHA=${SHA:-unknown}
R=$OUT/r && mkdir -p "$R"
TABLE=valora/ops/tables/NVIDIA_H200.json
TUNE_S=${TUNE_S:-420}
grid() {  # $1: output file; the grid on the table now in the package
  timeout 270 python3 bench/ops/bench_lora_ops.py --out "$1" --time-budget 240 \
    --sha "$SHA-$2" ${GRID_TOKENS:+--tokens "$GRID_TOKENS"} > "$R/bench_$2.log" 2>&1
  tail -n 3 "$R/bench_$2.log"; wc -l "$1"
}
if [ "${AB:-0}" = 1 ]; then grid "$R/lora_ops_before.jsonl" shipped; fi
if [ "$TUNE_S" != 0 ]; then
  VALORA_LORA_B_LAYOUT=rank timeout $((TUNE_S + 60)) python3 -m valora.ops.tuning \
    --tokens "${TOKENS:-128,256,512,1024,2048,4096,16384}" --ranks "${RANKS:-16,64}" \
    --adapters "${ADAPTERS:-1,8,32,128}" --layers "${LAYERS:-q,qkv,gate_up,down}" \
    --time-budget "$TUNE_S" ${NO_RESUME:+--no-resume} \
    2>&1 | tr '\r' '\n' | tail -n 5 > "$R/tune_log.txt"
fi
cp "$TABLE" "$R/NVIDIA_H200.json"
if [ "${GRID:-0}" = 1 ]; then grid "$R/lora_ops.jsonl" retuned; fi
cat "$R/tune_log.txt" 2>/dev/null
