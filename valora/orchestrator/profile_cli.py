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
from pathlib import Path

import torch

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
    return parser


def main(argv: list[str]) -> int:
    """Entry point; returns the exit code."""
    from valora.engine.components import resolve_model_path
    from valora.models.loader import load_model
    from valora.orchestrator.step_profiler import default_profile_path, device_label, run_profile

    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("valora profile-modes: --repeats must be at least 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = "torch"
    if device.type == "cuda":
        import contextlib
        import importlib

        from valora.layers.attention import available_attention_backends

        with contextlib.suppress(ImportError):  # registers Triton where that is not lazy yet
            importlib.import_module("valora.layers.attention_triton")

        backend = "triton" if "triton" in available_attention_backends() else "torch"
    try:
        model = load_model(str(resolve_model_path(args.model)), dtype=dtype, device=device,
                           load_format=args.load_format, attention_backend=backend)
        cost = run_profile(model, quick=args.quick, repeats=args.repeats)
    except ValoraError as exc:
        raise SystemExit(f"valora profile-modes: {exc}") from exc
    out = args.out or default_profile_path(device_label(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    cost.save(out)
    print(json.dumps({"file": str(out), "entry": cost.device_name, **cost.to_dict()}, indent=2))
    return 0
