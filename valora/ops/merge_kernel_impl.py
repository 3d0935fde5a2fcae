"""Triton kernel behind ``valora.ops.merge_kernel.lowrank_update_triton`` (imported lazily, so
``import valora.ops.merge_kernel`` needs no Triton)."""

# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lowrank_update_kernel(
    w_ptr, b_ptr, a_ptr, scale_ptr, rank_ptr, alpha, m, n, rank,
    stride_wm, stride_wn, stride_bm, stride_br, stride_ar, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FROM_MEMORY: tl.constexpr, TILES_N: tl.constexpr = 1,
):
    """``TILES_N`` consecutive ``BLOCK_M × BLOCK_N`` tiles of ``W``:
    ``W = round(W + alpha · B[rows] @ A[:, cols])``.

    The rank axis is padded to ``BLOCK_R`` (a power of two ≥ 16) with zeros, so the padded terms
    add nothing; the accumulation is fp32 and ``W`` is rounded once on the store. With
    ``TILES_N`` > 1 the program loads its ``B`` rows once and walks its tiles with the next
    tile's ``W`` load issued before the current tile's product and store (a program with one
    tile has nothing in flight while it multiplies and stores).
    ``FROM_MEMORY``: the rank is ``min(*rank_ptr, rank)`` and the factor ``alpha · *scale_ptr``,
    read on the device (a LoRA slot's rank and scale: a CUDA graph of the launch then serves
    whatever adapter the slot holds); rank 0 returns before touching ``W``."""
    if FROM_MEMORY:
        rank = tl.minimum(tl.load(rank_ptr), rank)
        if rank <= 0:
            return
        alpha = alpha * tl.load(scale_ptr)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < m
    rank_ok = ranks < rank
    b = tl.load(b_ptr + rows[:, None] * stride_bm + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter multiplies half blocks wrongly; exact in fp32
        b = b.to(tl.float32)
    first = pid_n * (TILES_N * BLOCK_N)
    cols = first + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + rows[:, None] * stride_wm
    w_next = tl.load(w_rows + cols[None, :] * stride_wn,
                     mask=row_ok[:, None] & (cols < n)[None, :], other=0.0)
    for t in tl.static_range(TILES_N):
        cols = first + t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        w = w_next
        if t + 1 < TILES_N:
            ahead = cols + BLOCK_N
            w_next = tl.load(w_rows + ahead[None, :] * stride_wn,
                             mask=row_ok[:, None] & (ahead < n)[None, :], other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_an,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        delta = tl.dot(b, a, input_precision=PRECISION)
        tl.store(w_rows + cols[None, :] * stride_wn,
                 (w.to(tl.float32) + alpha * delta).to(w_ptr.dtype.element_ty,
                                                       fp_downcast_rounding="rtne"),
                 mask=row_ok[:, None] & col_ok[None, :])
