#!/usr/bin/env bash
# The engine-level effect of one boolean engine flag on serving (default: piecewise graphs,
# `--prefill-graphs`; FLAG=async-output-processing for asynchronous output processing): the same
# workload (unmerged-fcfs, both popularity skews, the three rates of the session-8 grid, identical
# requests by seed) on two engines in turn, `--$FLAG true` then `false`, LLaVA-1.5-7B shapes
# (<= ~6.5 min, H200).
#   OUT=$OUT [FLAG=prefill-graphs] [ORDER="false true"] bash bench/orchestrator/piecewise_ab.sh [--tiny]
# Files under $OUT: ab-$FLAG-{true,false}.jsonl and .log
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
for value in ${ORDER:-true false}; do
  timeout -s INT "$BOX" python3 -m valora.cli --log-level info bench serve --model /tmp/ab-model \
    --load-format dummy "${ENGINE[@]}" "${WORK[@]}" --adapter-std 0.02 \
    --adapter-cache-dir /tmp/ab-adapters --popularity zipf:1 hot:0.7 --latency-target-s 5 \
    --starvation-s 10 --warmup-requests 16 --out "$OUT" --no-plot --policies unmerged-fcfs \
    --rates "${RATES[@]}" --num-requests "$N" --name "ab-$FLAG-$value" \
    "--$FLAG" "$value" > "$OUT/ab-$FLAG-$value.log" 2>&1
  echo "$FLAG $value: exit $?"
done
python3 - "$OUT" "$FLAG" <<'PY'
import json, sys
from pathlib import Path
out, flag = Path(sys.argv[1]), sys.argv[2]
rows = {}
for value in ("true", "false"):
    path = out / f"ab-{flag}-{value}.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        rows[(value, r["popularity"], round(r["rate_per_s"], 3))] = r
print(f"--{flag}: popularity  rate/s | mean ms: on  off  off/on | TTFT ms: on  off | "
      "eager-step s: on off | piecewise steps (on)")
for (g, pop, rate) in sorted(k for k in rows if k[0] == "true"):
    a, b = rows[("true", pop, rate)], rows.get(("false", pop, rate))
    if b is None:
        continue
    ma, mb = a["metrics"], b["metrics"]
    ea = (a.get("modes") or {}).get("eager_seconds", float("nan"))
    eb = (b.get("modes") or {}).get("eager_seconds", float("nan"))
    print(f"{pop:10s} {rate:7.2f} | {1e3*ma['mean_latency_s']:8.1f} {1e3*mb['mean_latency_s']:8.1f} "
          f"{mb['mean_latency_s']/ma['mean_latency_s']:5.2f}x | {1e3*ma['mean_ttft_s']:7.1f} "
          f"{1e3*mb['mean_ttft_s']:7.1f} | {ea:.2f} {eb:.2f} | "
          f"{(a.get('modes') or {}).get('piecewise_steps')}")
PY
