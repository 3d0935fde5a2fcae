"""Does the LoRA expand get cheaper inside the base GEMM? A measurement at the decode step.

``decode_gemm.py`` found a Triton skinny GEMM 7–10 % faster than cuBLAS for the 7B projections
at batch 8–32 (H200), and ``dense_pool.py`` that the LoRA ops' cost is their launches' latency
chains, not their bytes. A skinny GEMM owns a block of output columns for *every* token, so it
can add those columns' LoRA delta before it stores them: after its ``K`` loop, for each slot
of the batch, ``acc[rows of the slot] += (h[rows, chunk] · scale) · B_slot[chunk, cols]``.
The expand's ``B`` bytes then stream inside the GEMM's own grid (no launch, no ``y``
read-modify-write) and every program keeps the full batch. Rows are taken in the segments'
sorted order (``LoRASegments``: a slot's tokens are consecutive there), so a slot's delta is one
masked dot over the tile; ``x`` rows are gathered and ``y`` rows scattered through
``sorted_tokens``. ``B`` is read rank-major (``[S, R, out]``, the shipped layout).

Per scenario × layer of the model benchmark's decode step (``decode_tiles.py``'s problem: 32
slots of ranks 8–64, 32 tokens; weights rotated past L2), under CUDA graphs: ``cublas+atmm``
(what the model runs: ``F.linear`` then the shrink and the expand with the mix tiles),
``skinny+atmm`` (the same with ``decode_gemm``'s kernel for the base), ``fused`` (the ATMM
shrink, then the GEMM with the expand inside: best tile of a small grid), and the GEMMs alone.
Every output is checked against ``cublas+atmm`` first.

    python bench/ops/fused_gemm_lora.py --out $OUT/fused_gemm_lora.jsonl [--sha SHA] [--tiny]

The fused kernel takes slices of one width only (the 7B layers'); ``--tiny``'s qkv has three
widths, so its ``fused`` rows there are errors.
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from itertools import product
from typing import Any

import torch
import triton
import triton.language as tl
from decode_experiment import (
    best_columns,
    check_and_time,
    gemm_point,
    run_main,
    tolerance_of,
)
from decode_gemm import skinny_gemm

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_segments import LoRASegments
from valora.ops.triton_lora import launch_shrink

SKINNY = [(n, k, 4, s) for n, k, s in product((32, 64), (128, 256), (3, 4, 6))]
FUSED = [(n, k, w, s, r) for n, k, w, s, r in product((32, 64), (128, 256), (4,), (3, 4, 6),
                                                       (16, 32))]
"""(block_n, block_k, num_warps, num_stages[, block_r])."""


@triton.jit
def _gemm_lora(x_ptr, w_ptr, y_ptr, h_ptr, b_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
               M, N, K, stride_xm, stride_wn, stride_ym, tile_stride, num_tiles, split_k,
               split_stride, h_width, max_rank, num_slices, slice_width,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """``y[tok] = x[tok] @ w[cols]ᵀ + Σ_slot (h · scale) · B_slot[:, cols]`` for one column block,
    rows in sorted order (module docstring); ``tiles`` is the segments' list for a ``block_m`` ≥
    the batch, so each slot has one tile."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    tok = tl.load(sorted_ptr + rm, mask=m_ok, other=0).to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :],
                    mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                    mask=n_ok[None, :] & (kk[:, None] < K), other=0.0)
        acc += tl.dot(x, w)
    slice_id = (pid * BLOCK_N) // slice_width
    rr = tl.arange(0, BLOCK_R)
    for t in range(0, num_tiles):
        slot = tl.load(tiles_ptr + t)
        if slot >= 0:
            rank = tl.minimum(tl.load(ranks_ptr + slot * num_slices + slice_id), max_rank)
            scale = tl.load(scales_ptr + slot * num_slices + slice_id)
            start = tl.load(tiles_ptr + tile_stride + t)
            rows = tl.load(tiles_ptr + 2 * tile_stride + t)
            mine = (rm >= start) & (rm < start + rows)
            h_rows = h_ptr + rm[:, None].to(tl.int64) * h_width + slice_id * max_rank
            b_rows = b_ptr + slot.to(tl.int64) * max_rank * N + rn[None, :]
            for k0 in range(0, rank, BLOCK_R):
                kr = k0 + rr
                h_mask = mine[:, None] & (kr[None, :] < rank)
                h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for split in range(0, split_k):
                    h += tl.load(h_rows + split * split_stride + kr[None, :], mask=h_mask,
                                 other=0.0)
                b = tl.load(b_rows + kr[:, None] * N, mask=(kr[:, None] < rank) & n_ok[None, :],
                            other=0.0)
                acc = tl.dot((h * scale).to(b.dtype), b, acc)
    tl.store(y_ptr + tok[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemm_lora(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
              weights: LoRASlotWeights, segments: LoRASegments, tile: tuple) -> None:
    block_n, block_k, warps, stages, block_r = tile
    m, k = x.shape
    n = w.shape[0]
    assert weights.b_rank_major and m <= 128
    block_m = max(16, triton.next_power_of_2(m))
    tiles = segments.tile_list(128)
    widths = weights.slice_widths
    assert len(set(widths)) == 1 and widths[0] % block_n == 0
    _gemm_lora[(triton.cdiv(n, block_n),)](
        x, w, y, h, weights.lora_b, weights.ranks, weights.scales, segments.sorted_tokens,
        tiles, m, n, k, x.stride(0), w.stride(0), y.stride(0), segments.tile_capacity,
        segments.tile_bound(128), h.shape[0], h.stride(0), h.stride(1), weights.max_rank,
        len(widths), widths[0], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=block_r, num_warps=warps, num_stages=stages)


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    point = gemm_point(scenario, layer, layers, device, tokens, dtype)
    problem, lora, base, rounds = point.problem, point.lora, point.base, point.rounds
    weights, x, y, copies = problem.weights, problem.x, problem.y, problem.copies
    segments, table, gemm_copies = lora.segments, lora.tiles, len(base)
    tiny = device.type != "cuda"
    skinny_tiles = SKINNY[:1] if tiny else SKINNY
    fused_tiles = [(16, 32, 4, 2, 16)] if tiny else FUSED

    def atmm(out: torch.Tensor, i: int) -> None:
        lora.apply(x, weights[i % copies], out)

    def cublas(out: torch.Tensor, i: int) -> None:
        torch.mm(x, base[i % gemm_copies].t(), out=out)

    def skinny(out: torch.Tensor, i: int, tile: tuple) -> None:
        skinny_gemm(x, base[i % gemm_copies], out, tile)

    def fused(out: torch.Tensor, i: int, tile: tuple) -> None:
        h = launch_shrink(x, weights[i % copies], segments, table.shrink)
        gemm_lora(x, base[i % gemm_copies], out, h, weights[i % copies], segments, tile)

    variants: list[tuple[str, Any]] = [
        ("cublas", cublas), ("cublas+atmm", lambda out, i: (cublas(out, i), atmm(out, i)))]
    for tile in skinny_tiles:
        label = "n{} k{} w{} s{}".format(*tile)
        variants.append((f"skinny {label}", lambda out, i, t=tile: skinny(out, i, t)))
        variants.append((f"skinny+atmm {label}", lambda out, i, t=tile: (skinny(out, i, t),
                                                                          atmm(out, i))))
    for tile in fused_tiles:
        variants.append(("fused n{} k{} w{} s{} r{}".format(*tile),
                         lambda out, i, t=tile: fused(out, i, t)))
    row = point.row(scenario, layer, tokens, rate)
    want = torch.empty_like(y)
    cublas(want, 0)
    atmm(want, 0)
    check_and_time(row, variants, y, want, tolerance_of(dtype), "cuBLAS + ATMM", rounds, device,
                   lambda label: "atmm" in label or "fused" in label)  # GEMMs alone: no LoRA
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return best_columns(row, ("cublas", "cublas+atmm", "skinny", "skinny+atmm", "fused"))


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "lora_floor_us")
