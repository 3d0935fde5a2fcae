"""What the decode-step kernel experiments share (``expand_layout.py``, ``expand_gemv.py``,
``shrink_gemv.py``, ``one_launch_lora.py``): the problem at the model benchmark's decode step
(``decode_tiles.py``'s scenarios, widths and slot ranks; weights rotated over enough copies to
leave L2) and the command line that runs an experiment over every scenario × layer, writes one
JSONL row a point and prints, per point and per decode step (32 layers), the best time of each
column the experiment names.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from decode_tiles import L2_BYTES, LAYERS, NUM_SLOTS, SCENARIOS, SLOT_RANKS, TINY_LAYERS, TOKENS

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_problems import make_slot_weights
from valora.ops.timing import copy_rates, time_calls

LAYERS_PER_STEP = 32


@dataclass
class DecodeProblem:
    """One scenario × layer: ``copies`` slot-weight copies (the same ranks, other values), the
    tokens' slots, inputs ``x`` and outputs ``y``, and the bytes of the adapter parts read."""

    slots: list[int]
    ranks: list[int]
    """Every slot's rank (``SLOT_RANKS`` cycled), all slices."""
    used: list[int]
    weights: list[LoRASlotWeights]
    token_slots: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    nbytes: int

    @property
    def copies(self) -> int:
        return len(self.weights)

    @property
    def num_slots(self) -> int:
        return NUM_SLOTS


def decode_problem(scenario: str, layer: str, layers: dict, device: torch.device, tokens: int,
                   dtype: torch.dtype, parts: str) -> DecodeProblem:
    """The problem of ``scenario`` at ``layer``; ``parts`` (``"a"``, ``"b"`` or ``"ab"``) names the
    adapter matrices whose bytes count (the floor, and how many copies leave L2)."""
    in_features, widths = layers[layer]
    slots = SCENARIOS[scenario][:tokens]
    ranks = [SLOT_RANKS[s % 4] for s in range(NUM_SLOTS)]
    used = sorted(set(slots))
    per_rank = (in_features * len(widths) if "a" in parts else 0) + (
        sum(widths) if "b" in parts else 0)
    nbytes = 2 * sum(ranks[s] * per_rank for s in used)
    copies = max(1, min(8, -(-L2_BYTES // max(nbytes, 1))))
    weights = [make_slot_weights(ranks, in_features, widths, dtype, device, seed=i)
               for i in range(copies)]
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    y = torch.randn(tokens, sum(widths), device=device, dtype=dtype)
    token_slots = torch.tensor(slots, dtype=torch.int32, device=device)
    return DecodeProblem(slots, ranks, used, weights, token_slots, x, y, nbytes)


def base_weights(in_features: int, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of a random base weight ``[out, in]``, enough (≤ 4) to leave L2 between calls."""
    copies = max(1, min(4, -(-(100 << 20) // (2 * in_features * out_features))))
    return [torch.randn(out_features, in_features, device=device, dtype=dtype)
            / in_features ** 0.5 for _ in range(copies)]


def output_ok(errors: dict[str, str], key: str, launch: Callable[[torch.Tensor], object],
              start: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> bool:
    """Run ``launch`` once on a copy of ``start`` and compare the result with ``want`` (max abs
    difference ≤ ``tolerance`` × max(1, max |want|)); an exception (a config the GPU cannot run
    is a result) or a difference goes to ``errors[key]`` and gives False."""
    out = start.clone()
    try:
        launch(out)
    except Exception as error:
        errors[key] = f"{type(error).__name__}: {error}"[:300]
        return False
    diff = (out.float() - want.float()).abs().max().item()
    if diff > tolerance * max(1.0, want.float().abs().max().item()):
        errors[key] = f"differs from {what} by {diff:.3g}"
        return False
    return True


def time_variant(row: dict[str, Any], label: str, launch: Callable[[torch.Tensor, int], object],
                 start: torch.Tensor, rounds: int, device: torch.device) -> None:
    """``row["us"][label]``: the median µs of ``launch(out, i)`` over ``i`` in ``range(rounds)``
    (rotating weight copies) on one copy of ``start``, replayed from CUDA graphs; an exception
    goes to ``row["errors"][label]`` instead."""
    work = start.clone()
    try:
        timing = time_calls([lambda i=i: launch(work, i) for i in range(rounds)], device,
                            repeats=10)
    except Exception as error:
        row["errors"][label] = f"timing: {type(error).__name__}: {error}"[:300]
        return
    row["us"][label] = timing.median_us


RunPoint = Callable[[str, str, dict, torch.device, float, int, torch.dtype], dict[str, Any]]
Columns = Callable[[dict[str, Any]], dict[str, tuple[str, float]]]


def best_of(times: dict[str, float], prefix: str = "") -> tuple[str, float]:
    """The fastest ``(label, µs)`` among labels starting with ``prefix`` (``("-", 0)``: none)."""
    mine = {k: v for k, v in times.items() if k.startswith(prefix)}
    if not mine:
        return "-", 0.0
    label = min(mine, key=mine.__getitem__)
    return label, mine[label]


def run_main(doc: str, run_point: RunPoint, columns: Columns, floor_key: str) -> None:
    """``--out`` / ``--sha`` / ``--tiny`` (small shapes in the CPU interpreter, fp32): every
    scenario × layer through ``run_point``; prints ``columns(row)`` and the floor a point, then
    their sums over a decode step."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--tiny", action="store_true", help="small shapes, CPU interpreter")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    layers = TINY_LAYERS if args.tiny else LAYERS
    tokens = 4 if args.tiny else TOKENS
    rate = max(copy_rates(device, 1 << 20 if args.tiny else 1 << 30).values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}: best copy {rate / 1e12:.2f} TB/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    totals: dict[str, dict[str, float]] = {}
    with args.out.open("w") as sink:
        for scenario in SCENARIOS:
            for layer in layers:
                row = run_point(scenario, layer, layers, device, rate, tokens, dtype)
                row.update(device=name, git_sha=args.sha)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                total = totals.setdefault(scenario, {"floor": 0.0})
                total["floor"] += row[floor_key]
                parts = []
                for column, (label, us) in columns(row).items():
                    parts.append(f"{column} {us:6.1f} ({label})")
                    total[column] = total.get(column, 0.0) + us
                print(f"{scenario:<16} {layer:<7} " + " | ".join(parts)
                      + f" | floor {row[floor_key]:5.1f} | errors {len(row['errors'])}"
                      + "".join(f"\n    {k}: {v}" for k, v in row["errors"].items()),
                      flush=True)
    print(f"per decode step ({LAYERS_PER_STEP} layers), best per column, ms: " + "; ".join(
        f"{s}: " + ", ".join(f"{k} {LAYERS_PER_STEP * v / 1e3:.3f}" for k, v in t.items())
        for s, t in totals.items()))
