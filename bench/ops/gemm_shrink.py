"""Can the LoRA shrink ride in the base GEMM's launch, at the GEMM's efficiency? (Not run yet.)

With 32 adapters the decode step's shrinks take ≈ 1.1 ms for 0.51 ms of ``A`` bytes (split-K
tiles of one token each, latency-bound), while the skinny GEMM (``valora.ops.skinny_gemm``)
streams the base weight at ≈ 1.1–1.2× its bytes. A shrink *program* can be shaped like a skinny
GEMM program: one slot's rank chunk (``BLOCK_R`` rows of ``A``) against that slot's rows of
``x`` (its segment: ``LoRASegments``' tile list, positions in sorted order), the whole ``K`` in a
pipelined loop, ``h`` written for the segment's positions only (the layout ``launch_expand``
reads, one split plane). ``_gemm_shrink`` runs both kinds in one grid: the base GEMM's column
blocks first, then one program per (slot tile, slice, rank chunk) — chunks above a slot's rank
and tiles without a slot return at once. Bytes: the base weight plus the active adapters' ``A``
rows, once; the launch replaces two.

Per scenario × layer of the model benchmark's decode step (``decode_tiles.py``'s problem),
under CUDA graphs: ``skinny+atmm`` (the engine's serial path: skinny GEMM, ATMM shrink, ATMM
expand with the mix tiles), ``fused+expand`` (this kernel, then the same expand; best of a few
``BLOCK_R`` / stage choices), and the pieces alone (``skinny``, ``fused``, ``atmm``). Outputs are
checked against ``skinny+atmm`` first.

    python bench/ops/gemm_shrink.py --out $OUT/gemm_shrink.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from decode_experiment import (
    best_columns,
    gemm_point,
    run_main,
)

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_segments import LoRASegments
from valora.ops.skinny_gemm import SkinnyTile, skinny_linear, skinny_tile
from valora.ops.skinny_gemm_kernel import skinny_accumulate
from valora.ops.triton_lora import dot_flags, launch_expand

SHRINK_CHOICES = ((16, 0), (32, 0), (16, -1), (32, -1))
"""(``BLOCK_R``, stages relative to the base tile's) tried per point."""
SEGMENT_BLOCK_M = 32
"""The tile list the shrink programs walk: one tile per slot while the batch has ≤ 32 rows."""


@triton.jit
def _gemm_part(x_ptr, w_ptr, y_ptr, pid, M, N, K, stride_xm, stride_wn, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = skinny_accumulate(x_ptr + rm[:, None].to(tl.int64) * stride_xm,
                            w_ptr + rn[None, :].to(tl.int64) * stride_wn, m_ok, n_ok, K,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _shrink_part(x_ptr, a_ptr, h_ptr, ranks_ptr, sorted_ptr, tiles_ptr, q, K, stride_xm,
                 tile_stride, num_slices, max_rank, h_width,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    chunks = max_rank // BLOCK_R
    per_tile = num_slices * chunks
    tile = q // per_tile
    j = (q % per_tile) // chunks
    chunk = q % chunks
    slot = tl.load(tiles_ptr + tile)
    if slot >= 0:
        rank = tl.minimum(tl.load(ranks_ptr + slot * num_slices + j), max_rank)
        if chunk * BLOCK_R < rank:
            start = tl.load(tiles_ptr + tile_stride + tile)
            rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
            rm = tl.arange(0, BLOCK_M)
            m_ok = rm < rows
            tok = tl.load(sorted_ptr + start + rm, mask=m_ok, other=0).to(tl.int64)
            rr = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            a_rows = a_ptr + ((slot * num_slices + j) * max_rank + rr).to(tl.int64)[None, :] * K
            rk = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < K
                x = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_rows + kk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    a = a.to(tl.float32)
                acc = tl.dot(x, a, acc, input_precision=PRECISION)
            h_ptrs = h_ptr + (start + rm)[:, None].to(tl.int64) * h_width + j * max_rank + rr[None, :]
            tl.store(h_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _gemm_shrink(x_ptr, w_ptr, y_ptr, a_ptr, h_ptr, ranks_ptr, sorted_ptr, tiles_ptr,
                 M, N, K, stride_xm, stride_wn, stride_ym, num_col_blocks, tile_stride,
                 num_slices, max_rank, h_width,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Programs ``[0, num_col_blocks)``: ``y = x Wᵀ`` by column block; the rest: the shrink of
    one (slot tile, slice, rank chunk) into ``h[p, j·R + ρ]`` (module docstring)."""
    pid = tl.program_id(0)
    if pid < num_col_blocks:
        _gemm_part(x_ptr, w_ptr, y_ptr, pid, M, N, K, stride_xm, stride_wn, stride_ym,
                   BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    else:
        _shrink_part(x_ptr, a_ptr, h_ptr, ranks_ptr, sorted_ptr, tiles_ptr, pid - num_col_blocks,
                     K, stride_xm, tile_stride, num_slices, max_rank, h_width,
                     BLOCK_M, BLOCK_K, BLOCK_R, PRECISION, UPCAST)


def gemm_shrink(x: torch.Tensor, w: torch.Tensor, weights: LoRASlotWeights,
                segments: LoRASegments, tile: SkinnyTile, block_r: int,
                stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)``: the base GEMM and the shrink's ``h`` (``[1, T, J·R]`` fp32) in one launch."""
    m, k = x.shape
    n = w.shape[0]
    assert m <= SEGMENT_BLOCK_M and weights.max_rank % block_r == 0
    num_slices, max_rank = len(weights.slice_widths), weights.max_rank
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = torch.empty(1, m, num_slices * max_rank, dtype=torch.float32, device=x.device)
    num_col_blocks = triton.cdiv(n, tile.block_n)
    shrink_programs = segments.tile_bound(SEGMENT_BLOCK_M) * num_slices * (max_rank // block_r)
    _gemm_shrink[(num_col_blocks + shrink_programs,)](
        x, w, y, weights.lora_a, h, weights.ranks, segments.sorted_tokens,
        segments.tile_list(SEGMENT_BLOCK_M), m, n, k, x.stride(0), w.stride(0), y.stride(0),
        num_col_blocks, segments.tile_capacity, num_slices, max_rank, num_slices * max_rank,
        BLOCK_M=max(tile.block_m, SEGMENT_BLOCK_M), BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        BLOCK_R=block_r, **dot_flags(x.dtype), num_warps=tile.num_warps,
        num_stages=max(1, stages))
    return y, h


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    point = gemm_point(scenario, layer, layers, device, tokens, dtype)
    problem, lora, base = point.problem, point.lora, point.base
    weights, x, copies = problem.weights, problem.x, problem.copies
    segments, table, gemm_copies = lora.segments, lora.tiles, len(base)
    tile = skinny_tile(tokens, point.out_features, point.in_features, x.element_size())
    assert tile is not None
    choices = SHRINK_CHOICES[:1] if device.type != "cuda" else SHRINK_CHOICES

    def skinny(out: torch.Tensor, i: int) -> None:
        out.copy_(skinny_linear(x, base[i % gemm_copies], None, tile))

    def atmm(out: torch.Tensor, i: int) -> None:
        lora.apply(x, weights[i % copies], out)

    def skinny_atmm(out: torch.Tensor, i: int) -> None:
        skinny(out, i)
        atmm(out, i)

    def fused(out: torch.Tensor, i: int, block_r: int, stages: int, expand: bool) -> None:
        yy, h = gemm_shrink(x, base[i % gemm_copies], weights[i % copies], segments, tile,
                            block_r, stages)
        out.copy_(yy)
        if expand:
            launch_expand(h, out, weights[i % copies], segments, table.expand, 1.0)

    variants: list[tuple[str, Any]] = [("skinny", skinny), ("skinny+atmm", skinny_atmm),
                                       ("atmm", atmm)]
    for block_r, dstage in choices:
        stages = tile.num_stages + dstage
        label = f"r{block_r} s{stages}"
        variants.append((f"fused+expand {label}", lambda out, i, r=block_r, s=stages: fused(
            out, i, r, s, True)))
        variants.append((f"fused {label}", lambda out, i, r=block_r, s=stages: fused(
            out, i, r, s, False)))
    row = point.row(scenario, layer, tokens, rate)
    return point.check_and_time(row, tile, variants, dtype, device,
                                lambda label: label.startswith("fused+expand"))


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return best_columns(row, ("skinny", "skinny+atmm", "fused+expand", "fused", "atmm"))


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "lora_floor_us")
