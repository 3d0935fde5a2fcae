"""Single-launch Triton kernel of the batched LoRA op for small token counts (decode).

Notation as in ``valora.ops.lora_kernels``: slot storage rank ``R``, ``r = min(ranks[s, j], R)``,
tiles from ``LoRASegments`` (slot, start, rows in the slot-sorted token order).

One program per (tile, column group). A column group is ``COL_BLOCKS`` consecutive blocks of
``BLOCK_N`` columns of one slice ``j`` (groups never straddle slices; up to four slices per
launch, as the expand kernel). The program computes, for the tile's rows ``t``::

    h[t, ρ]    = scale[s, j] · mult · Σ_k x[t, k] · A[s, j, ρ, k]     for ρ < r   (fp32, full K)
    y[t, c]   += Σ_{ρ < r} round(h[t, ρ]) · B[s, c, ρ]                for c in the group's columns

so the rank-space product never leaves registers: no ``h`` buffer, no split-K planes to sum, one
launch instead of two. The price is that every column group of a (tile, slice) recomputes ``h``
and re-reads the tile's x rows and the slot's ``A[s, j, :r]`` (from L2 after the first read);
``COL_BLOCKS`` trades that re-reading against parallelism. ``BLOCK_R`` (constexpr) is the
storage rank rounded up to a power of two ≥ 16; loads above ``r`` are masked, so padding is never
read. ``FULL_RANK`` (the launcher's host copy of the ranks says every targeted slice has the
storage rank, which is ``BLOCK_R``): B loads drop the rank mask, so they stay 16 bytes wide.
Programs of unused tiles (slot -1) or rank-0 slices return before loading any weights.
``UPCAST``: interpreter only (see ``lora_kernels``).
"""

# Kernel arguments are symbolic Triton values (pointers, scalars, blocks): no Python annotations.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import triton
import triton.language as tl

from valora.ops.lora_kernels import _pick


@triton.jit(do_not_specialize=["tile_stride", "num_groups", "col_blocks",
                               "groups_1", "groups_2", "groups_3", "slice_base"])
def lora_fused_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_groups, col_blocks,
    groups_1, groups_2, groups_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, in_features, max_rank, out_features, stride_xm, stride_ym, scale_multiplier,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, FULL_RANK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    group_id = pid % num_groups
    tile = pid // num_groups
    slot = tl.load(tiles_ptr + tile)
    if slot < 0:
        return
    group = ((group_id >= groups_1).to(tl.int32) + (group_id >= groups_2).to(tl.int32)
             + (group_id >= groups_3).to(tl.int32))
    slice_id = slice_base + group
    rank = tl.minimum(tl.load(ranks_ptr + slot * num_slices + slice_id), max_rank)
    if rank <= 0:
        return
    scale = tl.load(scales_ptr + slot * num_slices + slice_id) * scale_multiplier
    first_group = _pick(group, 0, groups_1, groups_2, groups_3)
    col_begin = _pick(group, col_0, col_1, col_2, col_3)
    col_end = _pick(group, col_1, col_2, col_3, col_4)
    row_start = tl.load(tiles_ptr + tile_stride + tile)
    num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    # Rows past the tile re-read its last row (always valid memory); their results are not stored.
    tokens = tl.load(sorted_ptr + row_start + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    # Shrink over the whole K axis: h[BLOCK_M, BLOCK_R] stays in registers.
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :]
    a_base = a_ptr + (slot.to(tl.int64) * num_slices + slice_id) * max_rank * in_features
    a_ptrs = a_base + offs_r[None, :].to(tl.int64) * in_features + offs_k[:, None]
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, in_features, BLOCK_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
            a_tile = tl.load(a_ptrs, mask=r_ok[None, :], other=0.0)
        else:
            k_ok = k + offs_k < in_features
            x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            a_tile = tl.load(a_ptrs, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        h = tl.dot(x_tile, a_tile, h, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    h_low = (h * scale).to(y_ptr.dtype.element_ty)
    if UPCAST:
        h_low = h_low.to(tl.float32)
    # Expand over the group's column blocks.
    b_base = b_ptr + slot.to(tl.int64) * out_features * max_rank
    y_rows = y_ptr + tokens[:, None] * stride_ym
    first_col = col_begin + (group_id - first_group) * col_blocks * BLOCK_N
    for c in range(0, col_blocks):
        offs_n = first_col + c * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < col_end
        b_ptrs = b_base + offs_n[None, :].to(tl.int64) * max_rank + offs_r[:, None]
        if FULL_RANK:
            b_tile = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            b_tile = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(h_low, b_tile, input_precision=PRECISION)
        out_mask = m_ok[:, None] & n_ok[None, :]
        y_tile = tl.load(y_rows + offs_n[None, :], mask=out_mask, other=0.0)
        tl.store(y_rows + offs_n[None, :], (y_tile.to(tl.float32) + acc).to(y_tile.dtype),
                 mask=out_mask)
