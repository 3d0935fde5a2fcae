"""Does programmatic dependent launch (PDL) shorten a decode step's LoRA? A measurement first.

Every LoRA op of a decode step is two short launches (shrink, expand) behind the base GEMM, and
each pays a start-up chain before its bytes move: the launch, the tile's metadata loads (slot →
rank / scale → rows → tokens), then ``B`` (session 10's anatomy: ≈ 3.6 µs an expand with one
adapter whatever the bytes; session 11: four ways of moving the bytes faster, all refuted). On a
Hopper GPU a kernel launched with PDL may start while the kernel before it in the stream is
still running, once every program of that one has signalled (``gdc_launch_dependents``), and
waits (``gdc_wait``) only where it reads what the earlier kernel wrote. The shipped kernels take
a ``PDL`` constexpr (``lora_kernels``; ``triton_lora.launch_shrink`` / ``launch_expand``'s
``pdl``): 1 = signal at once, wait before reading ``x`` / ``h`` / ``y``; 2 (expand) = also load
the first rank chunk's ``B`` tile — a weight — before the wait, so the expand's biggest read
overlaps the shrink.

Per scenario × layer of the model benchmark's decode step (``decode_tiles.py``'s problem, table
tiles as the model takes them with known slots), timed under CUDA graphs (weights rotated past
L2): the base GEMM alone, GEMM + shrink + expand at PDL 0 / 1 / 2 (and 2 with the shrink
launched plainly: ``pdl12p``), and shrink + expand alone at 0 / 2; the LoRA tax is (GEMM + LoRA) − GEMM. Outputs of every PDL level are checked against
level 0 first.

    python bench/ops/pdl_lora.py --out $OUT/pdl_lora.jsonl [--sha SHA] [--tiny]

``--tiny`` runs the script's plumbing in the interpreter with PDL 0 only (no GPU, no PDL there).
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from decode_experiment import base_weights, check_and_time, decode_problem, run_main

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_segments import LoRASegments
from valora.ops.pdl import pdl_supported
from valora.ops.triton_lora import choose_tile_config, launch_expand, launch_shrink

LEVELS = ((0, 0, True), (1, 1, True), (1, 2, True), (1, 2, False))
"""(shrink ``pdl``, expand ``pdl``, shrink launched with PDL) timed; labels ``pdl{s}{e}`` and
``pdl{s}{e}p`` when the shrink is launched plainly (it still lets the expand start early)."""


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    problem = decode_problem(scenario, layer, layers, device, tokens, dtype, "ab")
    weights, x, y, copies = problem.weights, problem.x, problem.y, problem.copies
    in_features, widths = layers[layer]
    w_bytes = 2 * in_features * sum(widths)
    base = base_weights(in_features, sum(widths), device, dtype)
    gemm_copies = len(base)
    batch = prepare_lora_batch(problem.token_slots, problem.num_slots, "triton")
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments)
    table, source = choose_tile_config(x, weights[0], segments, None)
    levels = LEVELS if pdl_supported(device) else LEVELS[:1]

    def lora(out: torch.Tensor, i: int, shrink_pdl: int, expand_pdl: int,
             shrink_launch: bool = True) -> None:
        h = launch_shrink(x, weights[i % copies], segments, table.shrink, pdl=shrink_pdl,
                          pdl_launch=shrink_launch)
        launch_expand(h, out, weights[i % copies], segments, table.expand, 1.0, pdl=expand_pdl)

    def gemm(out: torch.Tensor, i: int) -> None:
        torch.mm(x, base[i % gemm_copies].t(), out=out)

    variants: list[tuple[str, Callable[[torch.Tensor, int], None]]] = [("gemm", gemm)]
    def name(sp: int, ep: int, launch: bool) -> str:
        return f"pdl{sp}{ep}" + ("" if launch or sp == 0 else "p")

    for sp, ep, la in levels:
        variants.append((f"gemm+lora {name(sp, ep, la)}", lambda out, i, sp=sp, ep=ep, la=la: (
            gemm(out, i), lora(out, i, sp, ep, la))))
    for sp, ep, la in dict.fromkeys((levels[0], levels[min(2, len(levels) - 1)])):
        variants.append((f"lora {name(sp, ep, la)}", lambda out, i, sp=sp, ep=ep, la=la: lora(
            out, i, sp, ep, la)))
    row: dict[str, Any] = {"scenario": scenario, "layer": layer, "tokens": tokens,
                           "table_source": source, "table": table.to_json(), "copies": copies,
                           "gemm_copies": gemm_copies, "lora_floor_us": problem.nbytes / rate * 1e6,
                           "gemm_floor_us": w_bytes / rate * 1e6, "us": {}, "errors": {}}
    reference = y.clone()
    lora(reference, 0, 0, 0)
    check_and_time(row, variants, y, reference, 1e-2, "PDL 0", max(copies, gemm_copies), device,
                   lambda label: label.startswith("lora "))
    us = row["us"]
    for sp, ep, la in levels:
        key = f"gemm+lora {name(sp, ep, la)}"
        if key in us and "gemm" in us:
            us[f"tax {name(sp, ep, la)}"] = us[key] - us["gemm"]
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    us = row["us"]
    return {k: (k, us[k]) for k in ("gemm", "tax pdl00", "tax pdl11", "tax pdl12", "tax pdl12p",
                                    "lora pdl00", "lora pdl12") if k in us}


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "lora_floor_us")
