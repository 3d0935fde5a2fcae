#!/usr/bin/env bash
# GPU serving benchmark for issue 5's bar: valora's mean latency >= 20 % lower than the best
# baseline policy (unmerged-fcfs, dlora, merged-only) at 3 rates x 2 popularity skews, same
# engine, card and trace. `valora bench serve`, in-process, on a dummy-weight model at
# LLaVA-1.5-7B shapes (bench/orchestrator/make_model_dir.py), 16 random adapters of ranks
# 8/16/32/64 on all seven projections.
#
# SHARED=1 (default): one process and one engine for every policy (`--shared-engine`): the first
# policy measures capacity with a burst; rates are 0.3 / 0.6 / 0.9 of it, requests per run are
# chosen so all runs fit RUN_BUDGET_S, and inside each (skew, rate) cell the policies take turns
# on the same engine (order reversed every other cell), each from the base weights with cold
# caches; REPEATS=N runs the grid N times on that engine and pools the comparison (one short
# run moved by up to 16 points per cell on the H200). On a fresh machine the engine's LoRA
# warm-up compiles ~140 kernel variants first (142 s with a cold Triton cache), inside the
# time box. SHARED=0: one process per policy (the runs up to session 6; a process's history
# weighed on its policy alone): the first calibrates, the others replay the identical workloads.
# Processes get the time left of HARD_LIMIT_S (killed beyond it; finished runs are kept).
#
#   usage (repository root):  OUT=/tmp/x bash bench/orchestrator/run_serve_gpu.sh [--tiny]
#   H200: <= 5 min (HARD_LIMIT_S=285). --tiny: default tiny model on the CPU (same path).
#
# Writes under $OUT: serve-gpu.jsonl, serve-gpu.md (table + valora-vs-best comparison),
# serve-gpu.png (latency vs rate; mode timeline), serve-gpu.log. Prints the comparison last.
# Uses only the engine's public API (valora.engine.llm.LLM via `valora bench serve`).
set -uo pipefail

OUT=${OUT:-/tmp/valora-serve-gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
WORK=$(mktemp -d)
NAME=serve-gpu
LOG="$OUT/$NAME.log"
START=$(date +%s)
: >"$LOG"

if [[ "${1:-}" == "--tiny" ]]; then
  python3 bench/orchestrator/make_model_dir.py --tiny --out "$WORK/model" >>"$LOG" 2>&1
  ENGINE=(--device cpu --dtype float32 --load-format dummy --max-loras 8)
  WORK_FLAGS=(--num-adapters 8 --adapter-ranks 8 16)
  CALIBRATION=8
  RUN_BUDGET_S=${RUN_BUDGET_S:-40}; HARD_LIMIT_S=${HARD_LIMIT_S:-280}
  NOTE="CPU smoke test of run_serve_gpu.sh (tiny model): not the GPU bar."
else
  python3 bench/orchestrator/make_model_dir.py --out "$WORK/model" >>"$LOG" 2>&1
  ENGINE=(--device cuda --dtype bfloat16 --load-format dummy --num-pages 4096
          --max-num-seqs 64 --max-loras 16 --max-cpu-loras 64 --max-lora-rank 64)
  WORK_FLAGS=(--num-adapters 16 --adapter-ranks 8 16 32 64)
  CALIBRATION=64
  RUN_BUDGET_S=${RUN_BUDGET_S:-100}; HARD_LIMIT_S=${HARD_LIMIT_S:-285}
  NOTE="LLaVA-1.5-7B shapes, dummy bf16 weights, 16 random adapters (ranks 8-64, all 7 projections); rates = 0.3/0.6/0.9 x burst capacity of the unmerged-fcfs engine; short runs (time-boxed)."
  if [[ "${SHARED:-1}" == "1" ]]; then
    NOTE="$NOTE One engine for every policy (--shared-engine): the policies take turns inside each cell (order reversed every other cell), each run from the base weights with empty prefix and image caches."
  else
    NOTE="$NOTE One process per policy."
  fi
fi
# valora runs second so a time cut drops a baseline (merged-only is usually the worst), not it.
# POLICY_ORDER (space-separated) reorders them, e.g. to repeat a grid in reverse and see how much
# of a difference is the process's place in the call; the first one calibrates.
read -r -a POLICIES <<<"${POLICY_ORDER:-unmerged-fcfs valora dlora merged-only}"
COMMON=(--model "$WORK/model" "${ENGINE[@]}" "${WORK_FLAGS[@]}" --adapter-std 0.02
        --adapter-cache-dir "$WORK/adapters" --popularity zipf:1 hot:0.7 --latency-target-s 5
        --starvation-s 10 --warmup-requests 16 --out "$WORK" --no-plot --step-trace)

run_policy() {  # POLICY EXTRA_FLAGS...
  local policy=$1; shift
  local left=$(( HARD_LIMIT_S - ($(date +%s) - START) - 15 ))
  if (( left < 30 )); then echo "skipping $policy: ${left}s left" | tee -a "$LOG"; return 0; fi
  echo "== $policy (${left}s left)" >>"$LOG"
  timeout --signal=INT --kill-after=10 "$left" \
    python3 -m valora.cli --log-level info bench serve "${COMMON[@]}" --policies "$policy" \
      --name "part-$policy" --deadline-s $(( left - 25 > 1 ? left - 25 : 1 )) "$@" >>"$LOG" 2>&1
  echo "$policy: exit status $?" | tee -a "$LOG"
  cat "$WORK/part-$policy.jsonl" >>"$OUT/$NAME.jsonl" 2>/dev/null
}

rm -f "$OUT/$NAME.jsonl"
if [[ "${SHARED:-1}" == "1" ]]; then
  # One process, one engine for every policy; the policies take turns inside each cell
  # (`--shared-engine`): no process history in the comparison, one engine start-up.
  left=$(( HARD_LIMIT_S - ($(date +%s) - START) - 15 ))
  echo "== shared engine: ${POLICIES[*]} (${left}s left)" >>"$LOG"
  timeout --signal=INT --kill-after=10 "$left" \
    python3 -m valora.cli --log-level info bench serve "${COMMON[@]}" \
      --policies "$(IFS=,; echo "${POLICIES[*]}")" --shared-engine --repeats "${REPEATS:-1}" \
      --name part-shared \
      --rates-of-capacity 0.3 0.6 0.9 --calibration-requests "$CALIBRATION" \
      --run-budget-s "$RUN_BUDGET_S" --deadline-s $(( left - 25 > 1 ? left - 25 : 1 )) >>"$LOG" 2>&1
  echo "shared engine: exit status $?" | tee -a "$LOG"
  cat "$WORK/part-shared.jsonl" >>"$OUT/$NAME.jsonl" 2>/dev/null
else
  # Budget is for all policies: the first process sees one policy, so give it a quarter.
  run_policy "${POLICIES[0]}" --rates-of-capacity 0.3 0.6 0.9 --calibration-requests "$CALIBRATION" \
    --run-budget-s "$(python3 -c "print($RUN_BUDGET_S / ${#POLICIES[@]})")"
  read -r NREQ RATES < <(python3 - "$OUT/$NAME.jsonl" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
rates = sorted({r["rate_per_s"] for r in rows})
print(max((len(r["requests"]) for r in rows), default=8), " ".join(f"{r:g}" for r in rates) or "1")
EOF
)
  echo "rates: $RATES; requests per run: $NREQ" | tee -a "$LOG"
  for policy in "${POLICIES[@]:1}"; do
    # shellcheck disable=SC2086
    run_policy "$policy" --rates $RATES --num-requests "$NREQ"
  done
fi

# Summary and plot from the rows written (each run's row is appended when it ends).
python3 - "$OUT/$NAME.jsonl" "$NOTE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
from valora.benchmarks.report import markdown_summary, plot, policy_comparison
path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
if not rows:
    sys.exit("no result rows")
path.with_suffix(".md").write_text(markdown_summary(rows, sys.argv[2]))
plot(rows, path.with_suffix(".png"))
capacity = rows[0].get("capacity_per_s")
print(f"{len(rows)} runs; device {rows[0]['device']}; capacity {capacity} req/s")
for row in rows:
    m = row["metrics"]
    print(f"{row['policy']:14s} {row['popularity']:8s} {row['rate_per_s']:7.2f}/s "
          f"n={int(m['num_requests']):3d} mean {1e3 * (m['mean_latency_s'] or 0):8.1f} ms "
          f"failed {int(m['num_failed'])} switches {(row.get('modes') or {}).get('num_switches', '-')}")
print(policy_comparison(rows) or "(no valora-vs-baseline cells)")
EOF
rm -rf "$WORK"
echo "total $(( $(date +%s) - START )) s"
