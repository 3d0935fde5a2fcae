"""Replay the requests of GPU serving runs in the simulator, with a stored profile as truth.

    python bench/orchestrator/replay_serve_runs.py GRID.jsonl [...] \\
        --profile valora/orchestrator/profiles/NVIDIA_H200.json \\
        --entry "NVIDIA H200 | h4096-i11008-l32-q32-kv32-d128" [--out OUT.jsonl]

For every (grid, popularity, rate) cell of ``valora bench serve`` rows, the requests of its
first run (arrival time, adapter, kind, output tokens) run through ``valora.orchestrator.
simulator`` under each policy, the prompt of a request taken from its kind (one image: 577 image
+ ``--question-tokens``; ``frames``: ``--frames`` images). Answers what the GPU grids cannot:
on exactly those arrivals, with step costs that do not drift with the host, how far apart the
policies are — and so how much of a GPU cell's spread is the engine's noise. On standard error:
the measured over the simulated mean latency of every run (how far the engine is from the model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from valora.orchestrator.cost_model import CostModel
from valora.orchestrator.policies import get_mode_policy
from valora.orchestrator.queue_view import AdapterInfo
from valora.orchestrator.simulator import SimConfig, simulate
from valora.orchestrator.workload import SimRequest, adapter_names, mixed_ranks

MERGE_BYTES_7B = 12_952_010_752
IMAGE_TOKENS = 577
POLICIES = ("unmerged-fcfs", "dlora", "merged-only", "valora")


def requests_of(row: dict[str, Any], question_tokens: int, frames: int) -> list[SimRequest]:
    """The run's requests as simulator requests (prompt length from the request's kind)."""
    out = []
    for request in row["requests"]:
        images = frames if request.get("kind") == "frames" else 1
        out.append(SimRequest(str(request["request_id"]), request["adapter"],
                              float(request["arrival_s"]), images * IMAGE_TOKENS + question_tokens,
                              max(1, int(request["num_output_tokens"]))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--entry", required=True)
    parser.add_argument("--question-tokens", type=int, default=45)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--seats", type=int, default=64)
    parser.add_argument("--starvation-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    truth = replace(CostModel.load(args.profile, args.entry), fused_correction=True)
    names = adapter_names(16)
    ranks = mixed_ranks(names, (8, 16, 32, 64))
    config = SimConfig({n: AdapterInfo(ranks[n], MERGE_BYTES_7B) for n in names},
                       max_num_seqs=args.seats)
    kwargs: dict[str, dict[str, Any]] = {
        "unmerged-fcfs": {}, "dlora": {"starvation_s": args.starvation_s},
        "merged-only": {"starvation_s": args.starvation_s},
        "valora": {"cost_model": truth, "starvation_s": args.starvation_s}}
    rows: list[dict[str, Any]] = []
    ratios: list[float] = []  # measured over simulated mean latency, every policy and cell
    print(f"| grid | popularity | rate | {' | '.join(POLICIES)} | valora vs best "
          "(simulated) | valora vs best (GPU run) |")
    print("|---|---|---|" + "---|" * len(POLICIES) + "---|---|")
    for path in args.grids:
        runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        cells: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
        for run in runs:
            cells.setdefault((run["popularity"], run["rate_per_s"]), {})[run["policy"]] = run
        for (popularity, rate), by_policy in sorted(cells.items()):
            first = next(iter(by_policy.values()))
            requests = requests_of(first, args.question_tokens, args.frames)
            means = {}
            for name in POLICIES:
                summary = simulate(get_mode_policy(name, **kwargs[name]), requests, config,
                                   truth).summary()
                means[name] = float(summary["mean_latency_s"])
                rows.append({"grid": path.name, "popularity": popularity, "rate": rate,
                             "policy": name, **{k: v for k, v in summary.items()
                                                if isinstance(v, int | float)}})
            best = min(v for k, v in means.items() if k != "valora")
            gpu = {k: v["metrics"]["mean_latency_s"] for k, v in by_policy.items()}
            ratios += [gpu[k] / means[k] for k in gpu if k in means and gpu[k] and means[k]]
            gpu_best = min((v for k, v in gpu.items() if k != "valora"), default=None)
            gpu_change = (f"{gpu['valora'] / gpu_best - 1:+.1%}"
                          if gpu_best and "valora" in gpu else "–")
            print(f"| {path.name} | {popularity} | {rate:g} | "
                  f"{' | '.join(f'{means[n] * 1e3:.0f}' for n in POLICIES)} | "
                  f"{means['valora'] / best - 1:+.1%} | {gpu_change} |")
    if ratios:
        ratios.sort()
        print(f"measured / simulated mean latency over {len(ratios)} runs: "
              f"{ratios[0]:.2f}–{ratios[-1]:.2f}× (median {statistics.median(ratios):.2f}×)",
              file=sys.stderr)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
