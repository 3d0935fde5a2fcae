"""Does leaving ``M`` unspecialised cost the skinny GEMM time? (9ac74d6 dropped the row-count
specialisation to compile one binary per ``BLOCK_M``; its speed was not measured.)

Per projection at LLaVA-1.5-7B widths (o, qkv, gate_up, down) and batch 1 / 8 / 16 / 32, under
CUDA graphs with the weight rotated past L2, the kernel body jitted with ``M`` unspecialised
(``M`` a runtime value, as 9ac74d6 shipped it) against it with ``M`` specialised (Triton's
default: ``M == 1`` and ``M % 16 == 0`` become compile-time facts; shipped again since b8aaaad
after this measured it at e9a1397, where the shipped launch was the unspecialised one), both at
the heuristic tile (``skinny_tile``: what the engine took before the H200 table's skinny
entries), checked against ``F.linear`` first.

    python bench/ops/skinny_specialise.py --out $OUT/skinny_specialise.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch.nn.functional as F
import triton
from decode_experiment import setup
from decode_gemm import SHAPES, TINY_SHAPES, gemm_problem

from valora.ops.skinny_gemm import skinny_tile, smem_limit
from valora.ops.skinny_gemm_kernel import _skinny_gemm_kernel
from valora.ops.timing import time_calls
from valora.ops.triton_lora import dot_flags

_KERNELS = {"specialised": triton.jit(_skinny_gemm_kernel.fn),
            "unspecialised": triton.jit(_skinny_gemm_kernel.fn, do_not_specialize=["M"])}


def launch(kind: str, x, weight, y, tile) -> None:
    grid = (triton.cdiv(weight.shape[0], tile.block_n),)
    _KERNELS[kind][grid](
        x, weight, y, y, x.shape[0], weight.shape[0], weight.shape[1], x.stride(0),
        weight.stride(0), y.stride(0), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, HAS_BIAS=False, **dot_flags(x.dtype), num_warps=tile.num_warps,
        num_stages=tile.num_stages)


def time_point(layer: str, batch: int, in_f: int, out_f: int, device, dtype, rate) -> dict:
    w_bytes = 2 * in_f * out_f
    weights, x, y = gemm_problem(batch, in_f, out_f, device, dtype)
    copies = len(weights)
    tile = skinny_tile(batch, out_f, in_f, x.element_size(), smem_limit(device))
    row: dict[str, Any] = {"layer": layer, "batch": batch, "in": in_f, "out": out_f,
                           "copies": copies, "tile": dataclasses.astuple(tile) if tile else None,
                           "floor_us": w_bytes / rate * 1e6, "us": {}, "errors": {}}
    if tile is None:
        return row
    want = F.linear(x, weights[0])
    variants = {kind: lambda i, kind=kind: launch(kind, x, weights[i], y, tile)
                for kind in ("unspecialised", "specialised")}
    for label, call in variants.items():
        y.zero_()
        call(0)
        diff = (y.float() - want.float()).abs().max().item()
        if diff > 2e-2 * max(1.0, want.float().abs().max().item()):
            row["errors"][label] = f"differs from F.linear by {diff:.3g}"
            continue
        row["us"][label] = time_calls([lambda i=i, c=call: c(i) for i in range(copies)], device,
                                      repeats=10).median_us
    return row


def main() -> None:
    run = setup(__doc__ or "")
    args, device, dtype, rate, name = run.args, run.device, run.dtype, run.rate, run.name
    shapes = TINY_SHAPES if args.tiny else SHAPES
    batches = (1, 4) if args.tiny else (1, 8, 16, 32)
    step: dict[int, dict[str, float]] = {}
    with args.out.open("w") as sink:
        for batch in batches:
            for layer, (in_f, out_f) in shapes.items():
                row = time_point(layer, batch, in_f, out_f, device, dtype, rate)
                row.update(device=name, git_sha=args.sha)
                sink.write(json.dumps(row) + "\n")
                total = step.setdefault(batch, {})
                for k, v in row["us"].items():
                    total[k] = total.get(k, 0.0) + v
                print(f"batch {batch:>2} {layer:<7} tile {row['tile']} | " + " | ".join(
                    f"{k} {v:6.1f}" for k, v in row["us"].items())
                    + f" | floor {row['floor_us']:5.1f} | errors {row['errors'] or 0}",
                    flush=True)
    for batch, total in step.items():
        print(f"batch {batch}: per decode step (32 layers), ms: " + ", ".join(
            f"{k} {32 * v / 1e3:.3f}" for k, v in total.items()))


if __name__ == "__main__":
    main()
