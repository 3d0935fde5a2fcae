"""Triton kernel behind ``valora.ops.merge_kernel.lowrank_update_triton`` (imported lazily, so
``import valora.ops.merge_kernel`` needs no Triton)."""

# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lowrank_update_kernel(
    w_ptr, b_ptr, a_ptr, alpha, m, n, rank,
    stride_wm, stride_wn, stride_bm, stride_br, stride_ar, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One ``BLOCK_M × BLOCK_N`` tile of ``W``: ``W = round(W + alpha · B[rows] @ A[:, cols])``.

    The rank axis is padded to ``BLOCK_R`` (a power of two ≥ 16) with zeros, so the padded terms
    add nothing; the accumulation is fp32 and ``W`` is rounded once on the store."""
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


@triton.jit
def lowrank_update_group_kernel(
    w_base, b_base, a_base, meta_ptr, alpha_ptr, m, n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ALIGN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``lowrank_update_kernel`` for many modules of one ``[m, n]`` shape in one launch.

    Program axis 2 is the module ``g``; its row ``meta[g] = (w_off, b_off, a_off, rank,
    stride_wm, stride_bm, stride_ar)`` (int64, element offsets from the three base pointers; the
    column stride of every operand is 1) and ``alpha[g]`` locate and scale its update. ``ALIGN``
    (a power of two, elements) divides every offset and row stride of ``W``: it lets the compiler
    vectorise the ``W`` traffic as it does for a tensor argument."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    row = meta_ptr + g * 7
    w_off = tl.multiple_of(tl.load(row), ALIGN)
    b_off = tl.load(row + 1)
    a_off = tl.load(row + 2)
    rank = tl.load(row + 3)
    stride_wm = tl.multiple_of(tl.load(row + 4), ALIGN)
    stride_bm = tl.load(row + 5)
    stride_ar = tl.load(row + 6)
    alpha = tl.load(alpha_ptr + g)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < m
    col_ok = cols < n
    rank_ok = ranks < rank
    b = tl.load(b_base + b_off + rows[:, None].to(tl.int64) * stride_bm + ranks[None, :],
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    a = tl.load(a_base + a_off + ranks[:, None].to(tl.int64) * stride_ar + cols[None, :],
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
        a = a.to(tl.float32)
    delta = tl.dot(b, a, input_precision=PRECISION)
    w_ptrs = w_base + w_off + rows[:, None].to(tl.int64) * stride_wm + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + alpha * delta).to(w_base.dtype.element_ty, fp_downcast_rounding="rtne"),
             mask=mask)
