"""Host time of the valora policy's online calibration per engine step (CPU only, no GPU).

    python bench/orchestrator/calibration_overhead.py [--profile P --entry E]

``ValoraPolicy.observe_step`` for decode steps of 1–64 rows (16 adapters of rank 16): the step
shape, the profile's prediction and the ratio update — what the engine adds to every step of a
valora-served run (its own mapping of the scheduled rows to ``RowWork`` comes on top).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from valora.orchestrator.calibration import StepCalibration
from valora.orchestrator.cost_model import CostModel, RowWork, StepSpec
from valora.orchestrator.modes import Mode
from valora.orchestrator.policies import get_mode_policy

PROFILE = Path(__file__).resolve().parents[2] / "valora/orchestrator/profiles/NVIDIA_H200.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=PROFILE)
    parser.add_argument("--entry", default="NVIDIA H200 | h4096-i11008-l32-q32-kv32-d128")
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    model = replace(CostModel.load(args.profile, args.entry), graph_max_rows=64,
                    fused_correction=True)
    policy = get_mode_policy("valora", cost_model=model, calibration=StepCalibration())
    for rows in (1, 8, 32, 64):
        spec = StepSpec(tuple(RowWork(f"adapter-{i % 16}", 16, 1, 700) for i in range(rows)),
                        Mode.UNMERGED)
        policy.observe_step(spec, 0.006, True)
        start = time.perf_counter()
        for _ in range(args.calls):
            policy.observe_step(spec, 0.006, True)
        per_call = (time.perf_counter() - start) / args.calls * 1e6
        print(f"observe_step, decode step of {rows:2} rows: {per_call:5.1f} µs")


if __name__ == "__main__":
    main()
