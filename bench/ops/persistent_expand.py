"""A persistent decode expand whose programs walk (tile, column block) work items in a software-
pipelined loop: is the 32-adapter expand's time its dependent-load chain, once per program?

At the model benchmark's decode step (batch 32, 32 adapters of ranks 8–64) the shipped expand
takes ≈ 12.5 µs a call for ≈ 4.4 µs of ``B`` bytes (session 16's anatomy,
``bench/results/model/h200-anatomy-2c3ab4f/``): each program serves one (tile, column block) —
tile list → slot → rank / scale → ``h`` / ``B`` → dot → ``y`` — and lives for little more than that
chain. Chunking the rank, more tiles a program and GEMV tiles did not move it (session 11,
``bench/ops/NOTES.md``); the lead left untested there: a grid of a few programs an SM, each
looping over work items ``pid, pid + grid, …`` with ``tl.range(..., num_stages=STAGES)`` so the
pipeliner can issue the next item's loads while the current one computes. The rank loop is unrolled
over the storage rank's chunks (``tl.static_range``, masked at the slot's rank: no inner run-time
loop to stop the outer pipelining), the ``h`` planes of a split-K shrink summed unrolled, dead
items (padding tiles, rank 0) masked instead of returned from.

Per scenario × layer (``decode_experiment``: LLaVA-1.5-7B widths, 32 tokens, rank-major ``B``,
weights rotated past L2): the shipped expand under the graph's table tiles (``shipped``) and the
persistent one over tiles × programs an SM × stages (``persistent``), each checked against the
shipped output first; per decode step (32 layers), the best of each.

    python bench/ops/persistent_expand.py --out $OUT/persistent_expand.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import Any

import torch
from decode_experiment import (
    best_columns,
    check_and_time,
    decode_problem,
    graph_lora,
    run_main,
    tolerance_of,
)

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_expand_persistent import launch_expand_persistent
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ExpandConfig
from valora.ops.triton_lora import dot_flags, launch_expand

TILES = ((16, 128, 16, 4), (16, 256, 16, 4), (16, 128, 32, 4), (16, 256, 32, 4),
         (16, 256, 64, 8))
"""``(block_m, block_n, block_k, num_warps)`` of the persistent variants."""
PROGRAMS_PER_SM = (1, 2, 4, 8)
STAGES = (1, 2, 3)


def launch_persistent(h: torch.Tensor, y: torch.Tensor, weights: LoRASlotWeights,
                      segments: LoRASegments, cfg: ExpandConfig) -> None:
    """``y += expand(h)`` (scale multiplier 1) by the shipped persistent kernel
    (``valora.ops.lora_expand_persistent``, ``cfg.persistent`` programs an SM), which this
    experiment's kernel became in session 17."""
    launch_expand_persistent(h, y, weights, segments, cfg, 1.0, dot_flags(y.dtype))


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    problem = decode_problem(scenario, layer, layers, device, tokens, dtype, "b")
    in_features, widths = layers[layer]
    lora = graph_lora(problem, in_features, tuple(widths))
    weights, segments = problem.weights, lora.segments
    from valora.ops.triton_lora import launch_shrink

    hs = [launch_shrink(problem.x, w, segments, lora.tiles.shrink) for w in weights]
    want = problem.y.clone()
    launch_expand(hs[0], want, weights[0], segments, lora.tiles.expand, 1.0)
    row: dict[str, Any] = {"scenario": scenario, "layer": layer, "tokens": tokens,
                           "table_source": lora.source, "table": lora.tiles.to_json(),
                           "copies": problem.copies, "split_k": int(hs[0].shape[0]),
                           "expand_floor_us": problem.nbytes / rate * 1e6, "us": {},
                           "errors": {}}
    variants: list[tuple[str, Any]] = [
        ("shipped", lambda out, i: launch_expand(hs[i], out, weights[i], segments,
                                                 lora.tiles.expand, 1.0))]
    grid = ([(TILES[0], 2, 2)] if device.type == "cpu" else
            [(t, p, s) for t in TILES for p in PROGRAMS_PER_SM for s in STAGES])
    for (m, n, k, w), per_sm, stages in grid:
        cfg = ExpandConfig(m, n, k, w, stages, persistent=per_sm)
        variants.append((f"persistent {m}x{n}x{k} w{w} p{per_sm} s{stages}",
                         lambda out, i, c=cfg: launch_persistent(hs[i], out, weights[i],
                                                                 segments, c)))
    check_and_time(row, variants, problem.y, want, tolerance_of(dtype), "the shipped expand",
                   problem.copies, device, lambda label: label != "shipped")
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return best_columns(row, ("shipped", "persistent"))


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "expand_floor_us")
