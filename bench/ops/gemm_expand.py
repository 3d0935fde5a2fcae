"""Can the LoRA expand ride in the base GEMM's reduction loop? (Session 15.)

At one token per adapter the expand is a chain of small dependent loads (tile → slot → rank →
``h`` / ``B``) in thousands of short programs: with 32 adapters at batch 32 it runs at ≈ 2–3× its
``B`` bytes, and beside the skinny GEMM on a side stream it barely overlaps (the GEMM holds every
SM). Written as a GEMM, the expand of a decode batch is one more stretch of the base GEMM's
reduction::

    y = x Wᵀ + Σ_tiles (H_tile · scale) B_slot        H_tile = h's rows of the tile's tokens,
                                                      zero elsewhere (a row mask)

so ``_gemm_expand`` is the skinny GEMM (one program per ``BLOCK_N`` output columns holding every
row, rows in the slot-sorted order) whose accumulator, after the ``K`` loop over ``W``, keeps
accumulating over the batch's slot tiles: per tile ``RANK_CHUNKS`` chunks of ``BLOCK_R`` rank rows
of ``B`` (rank-major: contiguous along the columns) against the tile's ``h`` rows — a flat,
pipelinable loop instead of a dependent chain per program. ``y`` is written once (no
read-modify-write, no ``δ`` buffer, no add); the shrink runs before it. With ``PDL`` the GEMM
launches as a programmatic dependent of the shrink and waits for ``h`` only after its ``W`` loop,
so the shrink runs under the GEMM's weight stream.

Per scenario × layer of the model benchmark's decode step (``decode_tiles.py``'s problem), under
CUDA graphs: ``skinny`` (the base GEMM alone, the table's tile), ``skinny+atmm`` (serial:
skinny GEMM, ATMM shrink, ATMM expand with the mix tiles), ``overlap`` (the engine's path at
decode: ``FusedLinear._forward_overlapped``'s side stream, ``δ`` and add), ``shrink+ge`` (the ATMM
shrink, then this kernel; ``BLOCK_R`` / stage choices) and ``pdl`` (the same with the dependent
launch). Outputs are checked against ``skinny+atmm`` first.

    PYTHONPATH=$PWD:$PWD/bench/ops python bench/ops/gemm_expand.py --out $OUT/gemm_expand.jsonl [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from decode_experiment import (
    best_columns,
    gemm_baselines,
    gemm_point,
    gemm_tiles,
    run_main,
    slice_ends,
)

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_kernels import gdc_wait
from valora.ops.lora_segments import LoRASegments
from valora.ops.pdl import pdl_supported
from valora.ops.skinny_gemm import SkinnyTile
from valora.ops.skinny_gemm_kernel import skinny_accumulate
from valora.ops.tile_config import BLOCK_M_CHOICES, ShrinkConfig
from valora.ops.triton_lora import dot_flags, launch_shrink

CHOICES = ((0, 1), (2, 1), (4, 1), (8, 1), (4, 2))
"""(``GROUP``, stages of the tile loop) tried per point: ``GROUP`` 0 is the first version (one
tile a step of the loop, ``BLOCK_R`` 16: a dependent load chain per tile — 3 µs a tile on an
H200); the others ``_gemm_expand_grouped`` (``BLOCK_R``: the storage rank's power of two)."""


@triton.jit
def _base_part(x_ptr, w_ptr, sorted_ptr, M, N, K, stride_xm, stride_wn, col_1, col_2, col_3,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PDL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """What both kernels do before their LoRA loop: the program's rows (the sorted order) and
    columns, the skinny GEMM's accumulator over ``W``, the slice of the column block, and (with
    ``PDL``) the wait for the shrink's ``h``."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    tokens = tl.load(sorted_ptr + tl.minimum(rm, M - 1)).to(tl.int64)
    acc = skinny_accumulate(x_ptr + tokens[:, None] * stride_xm,
                            w_ptr + rn[None, :].to(tl.int64) * stride_wn, m_ok, n_ok, K,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    col0 = pid * BLOCK_N
    slice_id = ((col0 >= col_1).to(tl.int32) + (col0 >= col_2).to(tl.int32)
                + (col0 >= col_3).to(tl.int32))
    if PDL > 0:
        gdc_wait()
    return rm, rn, m_ok, n_ok, tokens, acc, slice_id


@triton.jit
def _gemm_expand(x_ptr, w_ptr, y_ptr, h_ptr, b_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
                 used_ptr, M, N, K, stride_xm, stride_wn, stride_ym, tile_stride, split_stride,
                 h_width, num_slices, max_rank, col_1, col_2, col_3,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, RANK_CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
                 LORA_STAGES: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """``y[t, cols] = x[t] Wᵀ[:, cols] + LoRA`` for one block of columns (all in one slice:
    ``BLOCK_N`` divides every slice width) and every row, rows taken in the sorted order."""
    rm, rn, m_ok, n_ok, tokens, acc, slice_id = _base_part(
        x_ptr, w_ptr, sorted_ptr, M, N, K, stride_xm, stride_wn, col_1, col_2, col_3,
        BLOCK_M, BLOCK_N, BLOCK_K, PDL, PRECISION, UPCAST)
    used = tl.load(used_ptr)
    rr = tl.arange(0, BLOCK_R)
    h_rows = h_ptr + rm[:, None].to(tl.int64) * h_width + slice_id * max_rank
    for tile in tl.range(0, used, num_stages=LORA_STAGES):
        slot = tl.load(tiles_ptr + tile)
        start = tl.load(tiles_ptr + tile_stride + tile)
        rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
        own = tl.maximum(slot, 0)
        rank = tl.minimum(tl.load(ranks_ptr + own * num_slices + slice_id), max_rank)
        rank = tl.where(slot >= 0, rank, 0)
        scale = tl.load(scales_ptr + own * num_slices + slice_id)
        row_in = (rm >= start) & (rm < start + rows)
        b_slot = b_ptr + own.to(tl.int64) * N * max_rank + rn[None, :]
        for c in tl.static_range(RANK_CHUNKS):
            kr = c * BLOCK_R + rr
            r_ok = kr < rank
            h_mask = row_in[:, None] & r_ok[None, :]
            hv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sp in tl.static_range(SPLIT_K):
                hv += tl.load(h_rows + sp * split_stride + kr[None, :], mask=h_mask, other=0.0)
            b = tl.load(b_slot + kr[:, None].to(tl.int64) * N, mask=r_ok[:, None] & n_ok[None, :],
                        other=0.0)
            hv = (hv * scale).to(b.dtype)
            if UPCAST:
                hv = hv.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(hv, b, acc, input_precision=PRECISION)
    tl.store(y_ptr + tokens[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemm_expand_grouped(x_ptr, w_ptr, y_ptr, h_ptr, b_ptr, ranks_ptr, scales_ptr, sorted_ptr,
                         tiles_ptr, used_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                         tile_stride, split_stride, h_width, num_slices, max_rank,
                         col_1, col_2, col_3,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
                         LORA_STAGES: tl.constexpr, PDL: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr):
    """``_gemm_expand`` with the tile loop taken ``GROUP`` tiles at a time and no dependent
    chain per tile: the group's metadata in vector loads (slot / start / rows, then ranks and
    scales), its ``B`` rows in one ``[GROUP, BLOCK_R, BLOCK_N]`` load (``BLOCK_R`` ≥ the storage
    rank: one chunk a slot, masked at its rank) and ``h`` in one ``[GROUP, BLOCK_M, BLOCK_R]``
    load, then one dot of reduction length ``GROUP · BLOCK_R``."""
    rm, rn, m_ok, n_ok, tokens, acc, slice_id = _base_part(
        x_ptr, w_ptr, sorted_ptr, M, N, K, stride_xm, stride_wn, col_1, col_2, col_3,
        BLOCK_M, BLOCK_N, BLOCK_K, PDL, PRECISION, UPCAST)
    used = tl.load(used_ptr)
    rg = tl.arange(0, GROUP)
    rr = tl.arange(0, BLOCK_R)
    h_rows = h_ptr + rm[None, :, None].to(tl.int64) * h_width + slice_id * max_rank
    b_cols = b_ptr + rn[None, None, :]
    for g in tl.range(0, used, GROUP, num_stages=LORA_STAGES):
        t = g + rg
        t_ok = t < used
        slot = tl.load(tiles_ptr + t, mask=t_ok, other=-1)
        start = tl.load(tiles_ptr + tile_stride + t, mask=t_ok, other=0)
        rows = tl.load(tiles_ptr + 2 * tile_stride + t, mask=t_ok, other=0)
        own = tl.maximum(slot, 0)
        rank = tl.load(ranks_ptr + own * num_slices + slice_id, mask=slot >= 0, other=0)
        rank = tl.minimum(rank, max_rank)
        scale = tl.load(scales_ptr + own * num_slices + slice_id, mask=slot >= 0, other=0.0)
        r_ok = rr[None, :] < rank[:, None]                                   # [G, R]
        b = tl.load(b_cols + (own.to(tl.int64) * max_rank)[:, None, None] * N
                    + rr[None, :, None].to(tl.int64) * N,
                    mask=r_ok[:, :, None] & n_ok[None, None, :], other=0.0)   # [G, R, N]
        row_in = (rm[None, :] >= start[:, None]) & (rm[None, :] < (start + rows)[:, None])
        h_mask = row_in[:, :, None] & r_ok[:, None, :]                       # [G, M, R]
        hv = tl.zeros((GROUP, BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in tl.static_range(SPLIT_K):
            hv += tl.load(h_rows + sp * split_stride + rr[None, None, :], mask=h_mask, other=0.0)
        hv = (hv * scale[:, None, None]).to(b.dtype)
        hv = tl.reshape(tl.permute(hv, (1, 0, 2)), (BLOCK_M, GROUP * BLOCK_R))
        b = tl.reshape(b, (GROUP * BLOCK_R, BLOCK_N))
        if UPCAST:
            hv = hv.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(hv, b, acc, input_precision=PRECISION)
    tl.store(y_ptr + tokens[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemm_expand(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, weights: LoRASlotWeights,
                segments: LoRASegments, tiles: torch.Tensor, used: torch.Tensor,
                tile: SkinnyTile, block_r: int, stages: int, pdl: bool,
                group: int = 0) -> torch.Tensor:
    """``x Wᵀ + LoRA`` from the shrink's ``h`` (rank-major ``B``, no correction); ``group`` > 0:
    ``_gemm_expand_grouped`` (``block_r`` then covers the storage rank)."""
    assert weights.b_rank_major and segments.correction is None
    num_tokens, in_features = x.shape
    widths = weights.slice_widths
    assert len(widths) <= 4 and all(width % tile.block_n == 0 for width in widths)
    split_k, _, h_width = h.shape
    cols = slice_ends(widths)
    y = torch.empty(num_tokens, w.shape[0], dtype=x.dtype, device=x.device)
    launch = {"launch_pdl": True} if pdl else {}
    args = (x, w, y, h, weights.lora_b, weights.ranks, weights.scales, segments.sorted_tokens,
            tiles, used, num_tokens, w.shape[0], in_features, x.stride(0), w.stride(0),
            y.stride(0), segments.tile_capacity, num_tokens * h_width, h_width, len(widths),
            weights.max_rank, *cols)
    common = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                  SPLIT_K=split_k, LORA_STAGES=stages, PDL=int(pdl), **dot_flags(x.dtype),
                  num_warps=tile.num_warps, num_stages=tile.num_stages, **launch)
    grid = (triton.cdiv(w.shape[0], tile.block_n),)
    if group > 0:
        assert block_r >= weights.max_rank
        _gemm_expand_grouped[grid](*args, BLOCK_R=block_r, GROUP=group, **common)
    else:
        _gemm_expand[grid](*args, BLOCK_R=block_r,
                           RANK_CHUNKS=math.ceil(weights.max_rank / block_r), **common)
    return y


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    point = gemm_point(scenario, layer, layers, device, tokens, dtype)
    problem, lora, base = point.problem, point.lora, point.base
    weights, x, copies = problem.weights, problem.x, problem.copies
    segments, shrink_cfg = lora.segments, lora.tiles.shrink
    tile, ge_tile = gemm_tiles(point, device, tokens, x.element_size())
    block_m = next(m for m in BLOCK_M_CHOICES if m >= tokens)   # one tile per slot
    tiles = segments.tile_list(block_m)
    used = (tiles[0] >= 0).sum().to(torch.int32).view(1)

    def fused(out: torch.Tensor, i: int, group: int, stages: int, block_r: int,
              pdl: bool) -> None:
        cfg: ShrinkConfig = shrink_cfg
        h = launch_shrink(x, weights[i % copies], segments, cfg, pdl=int(pdl), pdl_launch=False)
        out.copy_(gemm_expand(x, base[i % len(base)], h, weights[i % copies], segments, tiles,
                              used, ge_tile, block_r, stages, pdl, group))

    variants = gemm_baselines(point, tile, device)
    rank_block = max(16, 1 << (weights[0].max_rank - 1).bit_length())
    for group, stages in CHOICES:
        block_r = rank_block if group else 16
        for pdl in (False, True) if pdl_supported(device) else (False,):
            name = "pdl" if pdl else "shrink+ge"
            variants.append((f"{name} g{group} s{stages}", lambda out, i, g=group, s=stages,
                             r=block_r, p=pdl: fused(out, i, g, s, r, p)))
    row = point.row(scenario, layer, tokens, rate)
    row["ge_block_n"] = ge_tile.block_n
    return point.check_and_time(row, tile, variants, dtype, device)


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return best_columns(row, ("skinny", "skinny+atmm", "overlap", "shrink+ge", "pdl"))


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "lora_floor_us")
