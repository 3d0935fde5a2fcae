"""Would a rank-major ``B`` make the decode expand cheaper? A measurement, not a feature.

``LoRASlotWeights.lora_b`` is ``[slots, out, R]``: each output column's ranks are contiguous, so
an expand tile ``[BLOCK_K ranks × BLOCK_N columns]`` of a rank-8 adapter in rank-64 storage
reads ``BLOCK_N`` pieces of 16–32 bytes at a 128-byte stride (and, unmasked along the rank for
vector width, the padding of the chunk). Stored rank-major, ``[slots, R, out]``, the same tile is
``BLOCK_K`` rows of ``BLOCK_N`` contiguous elements and a low-rank adapter reads only its own
rows (the mask is then along the strided axis, free). This times the shipped expand against an
expand that reads ``B`` rank-major (``_expand_rank_major`` below: the shipped kernel's
non-correction path with only ``B``'s addressing and mask changed), on the same ``h``, at the
model benchmark's decode step (32 tokens; one adapter r16, 8 adapters r16, 32 adapters of ranks
8–64 in storage rank 64; LLaVA-1.5-7B widths; weights rotated out of L2) and a few tiles; every
output is checked against the shipped one first.

    python bench/ops/expand_layout.py --out $OUT/expand_layout.jsonl [--sha SHA] [--tiny]

Session 10 ran it on an H200 (`bench/results/ops/expand-layout-h200-54ee2aa/`): rank-major took the
best-tile expand of a decode step from 2.06 to 1.79 ms with 32 adapters, 0.71 → 0.57 with 8, and
equal with one. The multi-tile variants (``MULTI_TILES`` tiles a program, either layout) were
added after that run and have only run in the interpreter.
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from decode_experiment import best_of, decode_problem, output_ok, run_main

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_kernels import _pick
from valora.ops.lora_launch_args import expand_split_constexpr, slice_groups
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ExpandConfig
from valora.ops.timing import time_calls
from valora.ops.triton_lora import (
    choose_tile_config,
    dot_flags,
    launch_expand,
    launch_shrink,
)

MULTI_TILES = (2, 4)
"""Tiles a program of the multi-tile rank-major expand handles (``_expand_multi``)."""
TILES = ((16, 128, 16, 4, 1), (16, 256, 16, 4, 1), (16, 128, 32, 4, 1), (16, 256, 32, 4, 1),
         (16, 512, 16, 4, 1), (16, 64, 16, 2, 1), (16, 256, 16, 8, 1), (16, 128, 16, 4, 2),
         (16, 128, 64, 4, 1), (16, 256, 64, 4, 1))


@triton.jit(do_not_specialize=["tile_stride", "num_col_blocks", "split_k",
                               "blocks_1", "blocks_2", "blocks_3", "slice_base"])
def _expand_rank_major(
    h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_col_blocks, split_k, split_stride,
    blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, max_rank, flat_rank, out_features, stride_ym, scale_multiplier,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``lora_expand_kernel`` without correction / early ``y``, reading ``B[slot, ρ, c]``."""
    pid = tl.program_id(0)
    col_block = pid % num_col_blocks
    tile = pid // num_col_blocks
    slot = tl.load(tiles_ptr + tile)
    if slot < 0:
        return
    group = ((col_block >= blocks_1).to(tl.int32) + (col_block >= blocks_2).to(tl.int32)
             + (col_block >= blocks_3).to(tl.int32))
    slice_id = slice_base + group
    rank = tl.minimum(tl.load(ranks_ptr + slot * num_slices + slice_id), max_rank)
    if rank <= 0:
        return
    scale = tl.load(scales_ptr + slot * num_slices + slice_id) * scale_multiplier
    first_block = _pick(group, 0, blocks_1, blocks_2, blocks_3)
    col_begin = _pick(group, col_0, col_1, col_2, col_3)
    col_end = _pick(group, col_1, col_2, col_3, col_4)
    offs_n = col_begin + (col_block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < col_end
    row_start = tl.load(tiles_ptr + tile_stride + tile)
    num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    h_rows = h_ptr + (row_start + offs_m)[:, None].to(tl.int64) * flat_rank + slice_id * max_rank
    b_base = b_ptr + slot.to(tl.int64) * max_rank * out_features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, rank, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < rank
        h_tile = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if SPLIT_K > 0:
            for split in tl.static_range(SPLIT_K):
                h_tile += tl.load(h_rows + split * split_stride + offs_k[None, :],
                                  mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            for split in range(0, split_k):
                h_tile += tl.load(h_rows + split * split_stride + offs_k[None, :],
                                  mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_tile = tl.load(b_base + offs_k[:, None].to(tl.int64) * out_features + offs_n[None, :],
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        h_tile = (h_tile * scale).to(b_tile.dtype)
        if UPCAST:
            h_tile = h_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(h_tile, b_tile, acc, input_precision=PRECISION)
    tokens = tl.load(sorted_ptr + row_start + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
    y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=out_mask)


@triton.jit(do_not_specialize=["tile_stride", "num_col_blocks", "num_tile_groups",
                               "split_k", "blocks_1", "blocks_2", "blocks_3", "slice_base"])
def _expand_multi(
    h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_col_blocks, num_tile_groups, split_k, split_stride,
    blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, max_rank, flat_rank, out_features, stride_ym, scale_multiplier,
    TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, RANK_MAJOR: tl.constexpr,
):
    """``_expand_rank_major`` over ``TILES`` consecutive tiles a program (one column block): the
    tiles' metadata, ``h`` and ``B`` loads are issued together (``[TILES, …]`` blocks, a batched
    dot), so one dependency chain moves ``TILES``× the bytes; each tile's rank masks its part.
    ``RANK_MAJOR`` False: ``B`` in the shipped ``[slots, out, R]`` layout, loaded unmasked along
    the rank (its padding is finite and meets zeros of ``h``, as in the shipped kernel)."""
    pid = tl.program_id(0)
    col_block = pid % num_col_blocks
    first_tile = (pid // num_col_blocks) * TILES
    offs_g = tl.arange(0, TILES)
    tile = first_tile + offs_g
    in_list = tile < num_tile_groups
    slot = tl.load(tiles_ptr + tile, mask=in_list, other=-1)
    used = slot >= 0
    own = tl.maximum(slot, 0)
    group = ((col_block >= blocks_1).to(tl.int32) + (col_block >= blocks_2).to(tl.int32)
             + (col_block >= blocks_3).to(tl.int32))
    slice_id = slice_base + group
    rank = tl.load(ranks_ptr + own * num_slices + slice_id, mask=used, other=0)
    rank = tl.where(used, tl.minimum(rank, max_rank), 0)
    top = tl.max(rank, axis=0)
    if top <= 0:
        return
    scale = tl.load(scales_ptr + own * num_slices + slice_id, mask=used, other=0.0) * scale_multiplier
    first_block = _pick(group, 0, blocks_1, blocks_2, blocks_3)
    col_begin = _pick(group, col_0, col_1, col_2, col_3)
    col_end = _pick(group, col_1, col_2, col_3, col_4)
    offs_n = col_begin + (col_block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < col_end
    row_start = tl.load(tiles_ptr + tile_stride + tile, mask=used, other=0)
    num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile, mask=used, other=0)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m[None, :] < num_rows[:, None]                                   # [G, M]
    h_rows = (h_ptr + (row_start[:, None] + offs_m[None, :]).to(tl.int64)[:, :, None] * flat_rank
              + slice_id * max_rank)                                              # [G, M, 1]
    b_base = b_ptr + own.to(tl.int64)[:, None, None] * max_rank * out_features   # [G, 1, 1]
    # (both layouts hold max_rank × out_features elements a slot)
    acc = tl.zeros((TILES, BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, top, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k[None, :] < rank[:, None]                                    # [G, K]
        h_mask = m_ok[:, :, None] & k_ok[:, None, :]
        h_tile = tl.zeros((TILES, BLOCK_M, BLOCK_K), dtype=tl.float32)
        for split in range(0, split_k):
            h_tile += tl.load(h_rows + split * split_stride + offs_k[None, None, :], mask=h_mask,
                              other=0.0)
        if RANK_MAJOR:
            b_tile = tl.load(b_base + offs_k[None, :, None].to(tl.int64) * out_features
                             + offs_n[None, None, :],
                             mask=k_ok[:, :, None] & n_ok[None, None, :], other=0.0)
        else:
            b_tile = tl.load(b_base + offs_n[None, None, :].to(tl.int64) * max_rank
                             + offs_k[None, :, None],
                             mask=(offs_k < max_rank)[None, :, None] & n_ok[None, None, :],
                             other=0.0)
        h_tile = (h_tile * scale[:, None, None]).to(b_tile.dtype)
        if UPCAST:
            h_tile = h_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(h_tile, b_tile, acc, input_precision=PRECISION)
    rows = row_start[:, None] + tl.minimum(offs_m[None, :], tl.maximum(num_rows[:, None] - 1, 0))
    tokens = tl.load(sorted_ptr + rows, mask=m_ok, other=0).to(tl.int64)          # [G, M]
    y_ptrs = y_ptr + tokens[:, :, None] * stride_ym + offs_n[None, None, :]
    out_mask = m_ok[:, :, None] & n_ok[None, None, :]
    y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=out_mask)


def launch_multi(h: torch.Tensor, y: torch.Tensor, b: torch.Tensor, weights: Any,
                 segments: LoRASegments, cfg: ExpandConfig, tiles: int, rank_major: bool) -> None:
    """``_expand_multi`` with ``b`` rank-major (``rank_major``) or ``weights.lora_b``."""
    split_k, num_tokens, width = h.shape
    widths = weights.slice_widths
    flat_rank = len(widths) * weights.max_rank
    bound = segments.tile_bound(cfg.block_m)
    groups = -(-bound // tiles)
    for first, num_col_blocks, starts, cols in slice_groups(widths, cfg.block_n):
        _expand_multi[(groups * num_col_blocks,)](
            h, b, y, weights.ranks, weights.scales, segments.sorted_tokens,
            segments.tile_list(cfg.block_m), segments.tile_capacity, num_col_blocks, bound,
            split_k, num_tokens * width, *starts, *cols, first, len(widths), weights.max_rank,
            flat_rank, sum(widths), y.stride(0), 1.0,
            TILES=tiles, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            **dot_flags(y.dtype), RANK_MAJOR=rank_major, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)


def launch_rank_major(h: torch.Tensor, y: torch.Tensor, b_rank_major: torch.Tensor,
                      weights: Any, segments: LoRASegments, cfg: ExpandConfig) -> None:
    split_k, num_tokens, width = h.shape
    widths = weights.slice_widths
    flat_rank = len(widths) * weights.max_rank
    bound = segments.tile_bound(cfg.block_m)
    for first, num_col_blocks, starts, cols in slice_groups(widths, cfg.block_n):
        _expand_rank_major[(bound * num_col_blocks,)](
            h, b_rank_major, y, weights.ranks, weights.scales, segments.sorted_tokens,
            segments.tile_list(cfg.block_m), segments.tile_capacity, num_col_blocks, split_k,
            num_tokens * width, *starts, *cols, first, len(widths), weights.max_rank, flat_rank,
            sum(widths), y.stride(0), 1.0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=expand_split_constexpr(split_k, cfg), **dot_flags(y.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    problem = decode_problem(scenario, layer, layers, device, tokens, dtype, "b", "column")
    weights, x, y, copies = problem.weights, problem.x, problem.y, problem.copies
    rank_major = [w.lora_b.transpose(1, 2).contiguous() for w in weights]
    batch = prepare_lora_batch(problem.token_slots, problem.num_slots, "triton")
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments)
    table, source = choose_tile_config(x, weights[0], segments, None)
    hs = [launch_shrink(x, w, segments, table.shrink) for w in weights]
    shipped = y.clone()
    launch_expand(hs[0], shipped, weights[0], segments, table.expand, 1.0)
    row: dict[str, Any] = {"scenario": scenario, "layer": layer, "tokens": tokens,
                           "table_source": source, "table": table.to_json(), "copies": copies,
                           "expand_floor_us": problem.nbytes / rate * 1e6, "column_major_us": {},
                           "rank_major_us": {}, "errors": {},
                           **{f"{kind}_x{g}_us": {} for g in MULTI_TILES
                              for kind in ("rank_major", "column_major")}}
    tiles = TILES[:1] if device.type == "cpu" else TILES  # the interpreter: correctness only
    configs = [("table", table.expand)] + [(f"{m}x{n}x{k} w{w} s{st}", ExpandConfig(m, n, k, w, st))
                                           for m, n, k, w, st in tiles]
    for label, cfg in configs:
        layouts: list[tuple[str, Any]] = [
            ("column_major", lambda h, out, i, c: launch_expand(h, out, weights[i], segments,
                                                                c, 1.0)),
            ("rank_major", lambda h, out, i, c: launch_rank_major(h, out, rank_major[i],
                                                                  weights[i], segments, c))]
        layouts += [(f"rank_major_x{g}", lambda h, out, i, c, g=g: launch_multi(
            h, out, rank_major[i], weights[i], segments, c, g, True)) for g in MULTI_TILES]
        layouts += [(f"column_major_x{g}", lambda h, out, i, c, g=g: launch_multi(
            h, out, weights[i].lora_b, weights[i], segments, c, g, False)) for g in MULTI_TILES]
        for layout, launch in layouts:
            if not output_ok(row["errors"], f"{layout} {label}",
                             lambda out, f=launch, c=cfg: f(hs[0], out, 0, c), y, shipped, 2e-2,
                             "the shipped expand"):
                continue
            work = y.clone()
            timing = time_calls([lambda i=i, c=cfg, f=launch, w=work: f(hs[i], w, i, c)
                                 for i in range(copies)], device, repeats=10)
            row[f"{layout}_us"][label] = timing.median_us
    return row


LAYOUTS = ("column_major", "rank_major",
           *(f"{kind}_x{g}" for kind in ("rank_major", "column_major") for g in MULTI_TILES))


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return {layout: best_of(row[f"{layout}_us"]) for layout in LAYOUTS}


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "expand_floor_us")
