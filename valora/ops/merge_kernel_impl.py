"""Triton kernel behind ``valora.ops.merge_kernel.lowrank_update_triton`` (imported lazily, so
``import valora.ops.merge_kernel`` needs no Triton)."""

# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl


# The slot's scale / rank entries sit at any 4-byte offset: no alignment specialisation, so one
# compiled kernel (warmed up before the first switch) serves every slot and slice.
@triton.jit(do_not_specialize=["scale_ptr", "rank_ptr"])
def lowrank_update_kernel(
    w_ptr, b_ptr, a_ptr, scale_ptr, rank_ptr, alpha, m, n, rank,
    stride_wm, stride_wn, stride_bm, stride_br, stride_ar, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FROM_MEMORY: tl.constexpr,
):
    """One ``BLOCK_M × BLOCK_N`` tile of ``W``: ``W = round(W + alpha · B[rows] @ A[:, cols])``.

    The rank axis is padded to ``BLOCK_R`` (a power of two ≥ 16) with zeros, so the padded terms
    add nothing; the accumulation is fp32 and ``W`` is rounded once on the store.
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
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < m
    col_ok = cols < n
    rank_ok = ranks < rank
    b = tl.load(b_ptr + rows[:, None] * stride_bm + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_an,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:  # the CPU interpreter multiplies half blocks wrongly; exact in fp32
        b = b.to(tl.float32)
        a = a.to(tl.float32)
    delta = tl.dot(b, a, input_precision=PRECISION)
    w_ptrs = w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + alpha * delta).to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=mask)
