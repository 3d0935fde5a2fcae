"""The serving grid in the simulator, with a stored (measured) cost model as ground truth.

Answers, without a GPU: under this device's measured step and switch costs, how much can any
mode policy win over unmerged-FCFS? Every policy replays the same workload (16 adapters of
ranks 8/16/32/64 round-robin, image-sized prompts of 600-700 tokens, 8-64 output tokens, Poisson
arrivals, Zipf(1) or one adapter with 70 % of the traffic) through ``valora.orchestrator.
simulator``; the ``valora`` policy plans with the same cost model that times the steps. Prints a
table of mean latencies (ms) and switches, and each policy's median host time per decision
(CPython on the machine running the script); ``--out`` also writes it as JSONL.

    python bench/orchestrator/simulate_profile.py \\
        --profile valora/orchestrator/profiles/NVIDIA_H200.json \\
        --entry "NVIDIA H200 | h4096-i11008-l32-q32-kv32-d128" --requests 1500
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from valora.orchestrator.calibration import StepCalibration
from valora.orchestrator.cost_model import CostModel
from valora.orchestrator.policies import get_mode_policy
from valora.orchestrator.queue_view import AdapterInfo
from valora.orchestrator.simulator import SimConfig, simulate
from valora.orchestrator.workload import (
    WorkloadSpec,
    adapter_names,
    generate_workload,
    mixed_ranks,
)

MERGE_BYTES_7B = 12_952_010_752  # all seven projections of LLaVA-1.5-7B's decoder, bf16


class _Timed:
    """A policy whose ``decide`` calls are timed (host wall clock)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.seconds = inner, inner.name, []

    def decide(self, *args: Any) -> Any:
        started = time.perf_counter()
        decision = self.inner.decide(*args)
        self.seconds.append(time.perf_counter() - started)
        return decision

    def observe_step(self, *args: Any) -> None:
        observe = getattr(self.inner, "observe_step", None)
        if observe is not None:
            observe(*args)


def scaled(model: CostModel, lora: float, switch: float, exact: bool) -> CostModel:
    """``model`` with its LoRA step coefficients (``lora_*`` and ``eager_lora_launches``) times
    ``lora``, its switch coefficients times ``switch`` and, with ``exact``, no recorded fit error
    (its graph coverage unchanged)."""
    step = {k: v * lora if k.startswith("lora_") or k == "eager_lora_launches" else v
            for k, v in model.step_coefficients.items()}
    return replace(model, step_coefficients=step,
                   switch_coefficients={k: v * switch
                                        for k, v in model.switch_coefficients.items()},
                   fit_info={} if exact else dict(model.fit_info))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--entry", required=True, help="the profile's device entry")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rates", type=float, nargs="+", default=[6.6, 13.2, 19.8])
    parser.add_argument("--seats", type=int, default=64)
    parser.add_argument("--starvation-s", type=float, default=10.0)
    parser.add_argument("--merge-bytes", type=int, default=MERGE_BYTES_7B)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="multiply the profile's LoRA step coefficients (what-if: a slower "
                             "or faster LoRA kernel)")
    parser.add_argument("--switch-scale", type=float, default=1.0,
                        help="multiply the profile's switch coefficients")
    parser.add_argument("--fused-correction", action="store_true",
                        help="the engine's LoRAConfig.fuse_correction: mixed-mode steps make "
                             "one LoRA launch, not two (step costs and the valora policy's "
                             "estimates alike; the profile measured two)")
    parser.add_argument("--exact-model", action="store_true",
                        help="the valora policy trusts the model (no fit-error switch margin): "
                             "in the simulator the model is the truth")
    parser.add_argument("--truth-eager-scale", type=float, default=1.0,
                        help="eager steps take this many times what the profile says (the GPU "
                             "serving runs measured 1.5-2x); the valora policy still plans with "
                             "the profile")
    parser.add_argument("--calibrate", action="store_true",
                        help="the valora policy calibrates its model online from the steps it "
                             "sees, as the engine's does (valora.orchestrator.calibration)")
    args = parser.parse_args(argv)
    planned = scaled(CostModel.load(args.profile, args.entry), args.lora_scale, args.switch_scale,
                     args.exact_model)
    planned = replace(planned, fused_correction=args.fused_correction)
    truth = replace(planned, eager_scale=args.truth_eager_scale)
    names = adapter_names(16)
    ranks = mixed_ranks(names, (8, 16, 32, 64))
    config = SimConfig({n: AdapterInfo(ranks[n], args.merge_bytes) for n in names},
                       max_num_seqs=args.seats)
    policies = (("unmerged-fcfs", {}), ("dlora", {"starvation_s": args.starvation_s}),
                ("merged-only", {"starvation_s": args.starvation_s}),
                ("valora", {"cost_model": planned, "starvation_s": args.starvation_s}))
    rows = []
    print(f"| popularity | rate req/s | {' | '.join(n for n, _ in policies)} | valora vs best |")
    print("|---|---|" + "---|" * len(policies) + "---|")
    for popularity, extra in (("zipf", {}), ("one-hot", {"hot_fraction": 0.7})):
        for rate in args.rates:
            requests = generate_workload(WorkloadSpec(
                args.requests, rate, names, popularity=popularity,  # type: ignore[arg-type]
                output_tokens=(8, 64), seed=args.seed, **extra))  # type: ignore[arg-type]
            means: dict[str, float] = {}
            cells = []
            for name, kwargs in policies:
                if name == "valora" and args.calibrate:
                    kwargs = {**kwargs, "calibration": StepCalibration()}
                policy = _Timed(get_mode_policy(name, **kwargs))
                summary = simulate(policy, requests, config, truth).summary()  # type: ignore[arg-type]
                decide_ms = 1e3 * statistics.median(policy.seconds)
                means[name] = float(summary["mean_latency_s"])
                cells.append(f"{means[name] * 1e3:.0f} ({int(summary['num_switches'])}, "
                             f"{decide_ms:.3f} ms)")
                rows.append({"profile": args.entry, "lora_scale": args.lora_scale,
                             "truth_eager_scale": args.truth_eager_scale,
                             "calibrate": args.calibrate,
                             "fused_correction": args.fused_correction,
                             "switch_scale": args.switch_scale, "exact_model": args.exact_model,
                             "popularity": popularity, "rate": rate,
                             "policy": name, "median_decision_ms": decide_ms,
                             **{k: v for k, v in summary.items() if isinstance(v, int | float)}})
            best = min(v for k, v in means.items() if k != "valora")
            print(f"| {popularity} | {rate:g} | {' | '.join(cells)} | "
                  f"{means['valora'] / best - 1:+.1%} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
