"""Refit a mode cost model offline from the samples ``valora profile-modes --samples`` wrote.

    python bench/orchestrator/refit_profile.py SAMPLES.jsonl --key "NVIDIA H200 | h4096-..." \
        --graph-max-rows 64 [--features ...] [--drop-correction-only] [--out PROFILE.json]

Samples written before the ``eager`` cost terms carry no ``eager`` flag: it is derived from
``--graph-max-rows`` as the engine decides it (a step of one-token rows, at most that many, is a
graph replay). ``--drop-correction-only`` leaves out mixed steps whose one LoRA launch is the
merged adapter's correction (base-model rows only): until the graph runner served them with the
``mixed`` graph they ran eagerly, so samples taken before measure a path that no longer exists.
``--features`` fits a subset (e.g. without ``attention_pairs`` when the samples hold only two
prefill lengths, which cannot separate an eager step's intercept, linear and quadratic terms).
Prints the fit's relative error per group of samples; ``--out`` saves the model under ``--key``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

from valora.orchestrator.cost_model import STEP_FEATURES, CostModel, StepShape, fit_cost_model

SHAPE_FIELDS = tuple(f.name for f in fields(StepShape) if f.name != "eager")


def shape_of(sample: dict[str, object], graph_max_rows: int) -> StepShape:
    values = {name: int(sample[name]) for name in SHAPE_FIELDS}  # type: ignore[call-overload]
    if "eager" in sample:
        eager = int(sample["eager"])  # type: ignore[call-overload]
    else:
        eager = int(graph_max_rows <= 0 or values["num_rows"] > graph_max_rows
                    or values["num_tokens"] != values["num_rows"])
    return StepShape(**values, eager=eager)


def correction_only(sample: dict[str, object]) -> bool:
    return sample.get("mode") == "mixed" and sample.get("lora_launches") == 1


def group_of(sample: dict[str, object], shape: StepShape) -> str:
    kind = "prefill" if shape.num_tokens != shape.num_rows else "decode"
    path = "eager" if shape.eager else "graph"
    return f"{kind}/{path}/{sample.get('mode')}/launches={shape.lora_launches}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path)
    parser.add_argument("--key", required=True, help="device | model-signature key of the model")
    parser.add_argument("--graph-max-rows", type=int, default=0)
    parser.add_argument("--features", default="", help="comma-separated subset of the features")
    parser.add_argument("--drop-correction-only", action="store_true")
    parser.add_argument("--out", type=Path, help="profile JSON to write (or update) under --key")
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("kind") == "step"]
    dropped = [r for r in steps if args.drop_correction_only and correction_only(r)]
    kept = [r for r in steps if r not in dropped]
    switches = [(int(r["bytes"]), float(r["seconds"])) for r in rows if r.get("kind") == "switch"]
    shapes = [shape_of(r, args.graph_max_rows) for r in kept]
    features = [f for f in args.features.split(",") if f] or None
    model = fit_cost_model(args.key, list(zip(shapes, (float(r["seconds"]) for r in kept),
                                              strict=True)),
                           switches, args.graph_max_rows, features)
    model.fit_info["num_dropped_samples"] = float(len(dropped))
    errors: dict[str, list[float]] = defaultdict(list)
    for sample, shape in zip(kept, shapes, strict=True):
        errors[group_of(sample, shape)].append(model.step_time(shape) / sample["seconds"] - 1)
    print(f"{len(kept)} step samples fitted ({len(dropped)} dropped), {len(switches)} switches; "
          f"step rel. RMSE {model.fit_info['step_rel_rmse']:.3f}")
    print(f"{'group':42} {'n':>3} {'rel. RMSE':>9} {'worst':>7}")
    for group, errs in sorted(errors.items()):
        rmse = math.sqrt(sum(e * e for e in errs) / len(errs))
        print(f"{group:42} {len(errs):3d} {rmse:9.3f} {max(errs, key=abs):+7.3f}")
    print("coefficients:", {k: float(f"{v:.4g}") for k, v in model.step_coefficients.items()
                            if k in STEP_FEATURES})
    if args.out is not None:
        model.save(args.out)
        CostModel.load(args.out, args.key)  # round-trips
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
