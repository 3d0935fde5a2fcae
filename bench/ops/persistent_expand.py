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
import triton
import triton.language as tl
from decode_experiment import (
    best_columns,
    check_and_time,
    decode_problem,
    graph_lora,
    run_main,
    tolerance_of,
)

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_kernels import _expand_chunk, _pick
from valora.ops.lora_launch_args import slice_groups
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ExpandConfig
from valora.ops.triton_lora import dot_flags, launch_expand

TILES = ((16, 128, 16, 4), (16, 256, 16, 4), (16, 128, 32, 4), (16, 256, 32, 4),
         (16, 256, 64, 8))
"""``(block_m, block_n, block_k, num_warps)`` of the persistent variants."""
PROGRAMS_PER_SM = (1, 2, 4, 8)
STAGES = (1, 2, 3)


@triton.jit(do_not_specialize=["tile_stride", "num_items", "num_col_blocks", "blocks_1",
                               "blocks_2", "blocks_3", "slice_base"])
def _expand_persistent(
    h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_items, num_col_blocks, split_stride,
    blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, max_rank, flat_rank, out_features, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, STAGES: tl.constexpr,
):
    """The shipped expand's non-correction path (``lora_kernels.lora_expand_kernel``, rank-major
    ``B``, scale multiplier 1) for work items ``pid, pid + grid, …`` of ``num_items`` =
    tiles × ``num_col_blocks`` (item = tile · ``num_col_blocks`` + column block, the shipped
    program order)."""
    offs_m = tl.arange(0, BLOCK_M)
    for item in tl.range(tl.program_id(0), num_items, tl.num_programs(0), num_stages=STAGES):
        col_block = item % num_col_blocks
        tile = item // num_col_blocks
        slot = tl.load(tiles_ptr + tile)
        own = tl.maximum(slot, 0)
        group = ((col_block >= blocks_1).to(tl.int32) + (col_block >= blocks_2).to(tl.int32)
                 + (col_block >= blocks_3).to(tl.int32))
        slice_id = slice_base + group
        rank = tl.minimum(tl.load(ranks_ptr + own * num_slices + slice_id), max_rank)
        rank = tl.where(slot >= 0, rank, 0)
        scale = tl.load(scales_ptr + own * num_slices + slice_id)
        first_block = _pick(group, 0, blocks_1, blocks_2, blocks_3)
        col_begin = _pick(group, col_0, col_1, col_2, col_3)
        col_end = _pick(group, col_1, col_2, col_3, col_4)
        offs_n = col_begin + (col_block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < col_end
        row_start = tl.load(tiles_ptr + tile_stride + tile)
        num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
        num_rows = tl.where(rank > 0, num_rows, 0)  # a dead item writes nothing
        m_ok = offs_m < num_rows
        h_rows = (h_ptr + (row_start + offs_m)[:, None].to(tl.int64) * flat_rank
                  + slice_id * max_rank)
        b_cols = b_ptr + own.to(tl.int64) * out_features * max_rank + offs_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for chunk in tl.static_range(CHUNKS):  # masked at the rank: no run-time inner loop
            acc = _expand_chunk(acc, h_rows, b_cols, chunk * BLOCK_K, rank, SPLIT_K,
                                split_stride, scale, m_ok, n_ok, BLOCK_M, BLOCK_K, SPLIT_K, True,
                                True, 1, PRECISION, UPCAST, True, out_features)
        tokens = tl.load(sorted_ptr + row_start + offs_m, mask=m_ok, other=0).to(tl.int64)
        y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
        tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=out_mask)


def launch_persistent(h: torch.Tensor, y: torch.Tensor, weights: LoRASlotWeights,
                      segments: LoRASegments, cfg: ExpandConfig, programs: int,
                      stages: int) -> None:
    """``y += expand(h)`` (scale multiplier 1) with at most ``programs`` programs a launch."""
    if not weights.b_rank_major:
        raise ValueError("the persistent expand reads rank-major B (the engine's layout)")
    split_k, num_tokens, width = h.shape
    widths = weights.slice_widths
    bound = segments.tile_bound(cfg.block_m)
    for first, num_col_blocks, starts, cols in slice_groups(widths, cfg.block_n):
        items = bound * num_col_blocks
        if items == 0:
            continue
        _expand_persistent[(min(items, programs),)](
            h, weights.lora_b, y, weights.ranks, weights.scales, segments.sorted_tokens,
            segments.tile_list(cfg.block_m), segments.tile_capacity, items, num_col_blocks,
            num_tokens * width, *starts, *cols, first, len(widths), weights.max_rank,
            len(widths) * weights.max_rank, sum(widths), y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            CHUNKS=triton.cdiv(weights.max_rank, cfg.block_k), SPLIT_K=split_k,
            **dot_flags(y.dtype), STAGES=stages, num_warps=cfg.num_warps, num_stages=stages)


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
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    variants: list[tuple[str, Any]] = [
        ("shipped", lambda out, i: launch_expand(hs[i], out, weights[i], segments,
                                                 lora.tiles.expand, 1.0))]
    grid = ([(TILES[0], 2, 2)] if device.type == "cpu" else
            [(t, p, s) for t in TILES for p in PROGRAMS_PER_SM for s in STAGES])
    for (m, n, k, w), per_sm, stages in grid:
        cfg = ExpandConfig(m, n, k, w, stages)
        variants.append((f"persistent {m}x{n}x{k} w{w} p{per_sm} s{stages}",
                         lambda out, i, c=cfg, p=per_sm * sms, s=stages: launch_persistent(
                             hs[i], out, weights[i], segments, c, p, s)))
    check_and_time(row, variants, problem.y, want, tolerance_of(dtype), "the shipped expand",
                   problem.copies, device, lambda label: label != "shipped")
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return best_columns(row, ("shipped", "persistent"))


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "expand_floor_us")
