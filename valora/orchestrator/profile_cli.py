"""``valora profile-modes``: profile the mode cost model (step time per mode over tokens, rows,
adapters and ranks; switch time) on this device and store it for the engine.

The result is written to ``--out`` (default: ``valora/orchestrator/profiles/<GPU name>.json``,
the file the engine's ``ModeController`` reads when ``cost_model_path`` is not set), under the
entry ``"<device> | <model shape>"``; other entries of the file are kept.

    valora profile-modes --model /path/to/checkpoint --load-format dummy      # GPU, ~1 min at 7B
    valora profile-modes --model default --device cpu --quick --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from valora.errors import ValoraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valora profile-modes", description=__doc__)
    parser.add_argument("--model", default="default", help="checkpoint directory or 'default'")
    parser.add_argument("--load-format", choices=("safetensors", "dummy"), default="dummy")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="profile file (default: the per-GPU file the engine reads)")
    parser.add_argument("--quick", action="store_true", help="a tiny grid (tests, CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=Path, default=None,
                        help="also write every fitted sample (features, seconds) as JSONL here")
    parser.add_argument("--fuse-correction", action=argparse.BooleanOptionalAction, default=True,
                        help="time mixed steps with the correction in the same LoRA op, as the "
                             "engine runs them by default (LoRAConfig.fuse_correction); "
                             "--no-fuse-correction: as two ops")
    parser.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="time prefill steps as piecewise-graph replays, as the engine runs "
                             "them by default (ModelConfig.prefill_graphs; CUDA only)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="time decode steps as eager forwards (default on CUDA: CUDA-graph "
                             "replays, as the engine runs them)")
    return parser


def main(argv: list[str]) -> int:
    """Entry point; returns the exit code."""
    from valora.engine.components import (
        attention_backend_for,
        resolve_device,
        resolve_dtype,
        resolve_model_path,
    )
    from valora.models.loader import load_model
    from valora.orchestrator.step_profiler import default_profile_path, device_label, run_profile

    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("valora profile-modes: --repeats must be at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    backend = attention_backend_for("auto", device)
    try:
        model = load_model(str(resolve_model_path(args.model)), dtype=dtype, device=device,
                           load_format=args.load_format, attention_backend=backend)
        samples: list[dict[str, object]] = []
        cost = run_profile(model, quick=args.quick, repeats=args.repeats,
                           graphs=not args.enforce_eager, samples=samples,
                           fuse_correction=args.fuse_correction,
                           piecewise=args.prefill_graphs)
    except ValoraError as exc:
        raise SystemExit(f"valora profile-modes: {exc}") from exc
    out = args.out or default_profile_path(device_label(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    cost.save(out)
    if args.samples is not None:
        args.samples.parent.mkdir(parents=True, exist_ok=True)
        args.samples.write_text("".join(json.dumps(row) + "\n" for row in samples))
    result = {"file": str(out), "entry": cost.device_name, **cost.to_dict()}
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0
