#!/usr/bin/env bash
# The engine-level effect of one boolean engine flag on serving (default: piecewise graphs,
# `--prefill-graphs`; FLAG=async-output-processing for asynchronous output processing): the same
# workload (unmerged-fcfs, both popularity skews, the three rates of the session-8 grid, identical
# requests by seed) on engines run in turn, LLaVA-1.5-7B shapes (<= ~3.5 min an engine, H200).
#   OUT=$OUT [FLAG=prefill-graphs] [ORDER="true false"] [WARMUP=1] \
#       bash bench/orchestrator/piecewise_ab.sh [--tiny]
# ORDER lists the flag values to run, in order, and may repeat them ("true false false true");
# run n of a value writes ab-$FLAG-$value-$n.{jsonl,md,log} under $OUT, and the table averages a
# value's runs per point. WARMUP=1 first runs one discarded engine (the first value, the lowest
# rate, 16 requests: ab-$FLAG-warmup.log): the engine that ran first was slower in both orders of
# session 12's A/B (its eager steps 2-21 % longer), which decided the outcome; warming first
# gives every measured engine the same caches.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
FLAG=${FLAG:-prefill-graphs}
if [[ "${1:-}" == "--tiny" ]]; then
  python3 bench/orchestrator/make_model_dir.py --tiny --out /tmp/ab-model > /dev/null
  ENGINE=(--device cpu --dtype float32 --max-loras 4); WORK=(--num-adapters 4 --adapter-ranks 8)
  RATES=(2 4); N=6; BOX=150
else
  python3 bench/orchestrator/make_model_dir.py --out /tmp/ab-model > /dev/null
  ENGINE=(--device cuda --dtype bfloat16 --num-pages 4096 --max-num-seqs 64 --max-loras 16
          --max-cpu-loras 64 --max-lora-rank 64)
  WORK=(--num-adapters 16 --adapter-ranks 8 16 32 64)
  RATES=(7.587 15.174 22.761); N=77; BOX=${BOX:-210}
fi
run_engine() {  # value name rates... ; then the request count in $COUNT
  local value=$1 name=$2; shift 2
  timeout -s INT "$BOX" python3 -m valora.cli --log-level info bench serve --model /tmp/ab-model \
    --load-format dummy "${ENGINE[@]}" "${WORK[@]}" --adapter-std 0.02 \
    --adapter-cache-dir /tmp/ab-adapters --popularity zipf:1 hot:0.7 --latency-target-s 5 \
    --starvation-s 10 --warmup-requests 16 --out "$OUT" --no-plot --policies unmerged-fcfs \
    --rates "$@" --num-requests "$COUNT" --name "$name" \
    "--$FLAG" "$value" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"
}
values=(${ORDER:-true false})
if [[ "${WARMUP:-1}" == "1" ]]; then
  COUNT=16 run_engine "${values[0]}" "ab-$FLAG-warmup" "${RATES[0]}"
  rm -f "$OUT/ab-$FLAG-warmup.jsonl" "$OUT/ab-$FLAG-warmup.md"
fi
declare -A seen=()
for value in "${values[@]}"; do
  seen[$value]=$(( ${seen[$value]:-0} + 1 ))
  COUNT=$N run_engine "$value" "ab-$FLAG-$value-${seen[$value]}" "${RATES[@]}"
done
python3 - "$OUT" "$FLAG" <<'PY'
import json, statistics, sys
from pathlib import Path
out, flag = Path(sys.argv[1]), sys.argv[2]
runs = {}  # (value, popularity, rate) -> list of rows, one a run
for value in ("true", "false"):
    for path in sorted(out.glob(f"ab-{flag}-{value}-*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            runs.setdefault((value, r["popularity"], round(r["rate_per_s"], 3)), []).append(r)

def mean(rows, key):
    return statistics.fmean(r["metrics"][key] for r in rows)

def eager(rows):
    return statistics.fmean((r.get("modes") or {}).get("eager_seconds", float("nan"))
                            for r in rows)

print(f"--{flag}: popularity  rate/s | runs on/off | mean ms: on  off  off/on | TTFT ms: on  "
      "off | eager-step s: on off")
for (g, pop, rate) in sorted(k for k in runs if k[0] == "true"):
    a, b = runs[("true", pop, rate)], runs.get(("false", pop, rate))
    if not b:
        continue
    ma, mb = mean(a, "mean_latency_s"), mean(b, "mean_latency_s")
    print(f"{pop:10s} {rate:7.2f} | {len(a)}/{len(b)} | {1e3*ma:8.1f} {1e3*mb:8.1f} "
          f"{mb/ma:5.2f}x | {1e3*mean(a, 'mean_ttft_s'):7.1f} {1e3*mean(b, 'mean_ttft_s'):7.1f} "
          f"| {eager(a):.2f} {eager(b):.2f}")
PY
