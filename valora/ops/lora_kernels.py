"""Triton kernels of the batched LoRA op: shrink and expand over token tiles grouped by slot.

Notation: ``J`` slices, ``R`` slot storage rank, ``K`` input width, ``r_j = min(ranks[s, j], R)``;
the rank axis of all slices is flattened, ``n = j·R + ρ`` (this is ``lora_a[s]`` viewed as
``[J·R, K]``). Tiles come from ``LoRASegments`` (slot, start, rows in the slot-sorted token order).

Semantics (``p`` = position in the sorted order, ``t = sorted_tokens[p]``, ``s`` its slot)::

    shrink:  h[split, p, n] = Σ_{k in split's K range} x[t, k] · A[s, n, k]     for ρ < r_j
    expand:  y[t, c] += scale[s, j] · mult · Σ_{ρ < r_j} (Σ_split h[split, p, j·R+ρ]) · B[s, c, ρ]
             for every column c of slice j

Programs whose tile is unused (slot -1), whose rank block lies wholly above the slot's ranks, or
whose slice has rank 0 return before touching memory: work and bytes follow each slot's own
ranks, never the storage rank. ``h`` entries above a slot's rank are never read. Every (token,
column) of ``y`` belongs to exactly one expand program, so no atomics are needed.

``CORRECTION`` (mixed mode in one op, ``valora.ops.lora``): ``h`` rows are ``2·J·R`` wide; the
shrink fills ``[J·R, 2·J·R)`` from the merged slot ``m = corr[0]`` for every tile (tiles of slot
-2 hold base rows to correct and fill only that half), and the expand adds
``−scale[m, j] · mult · Σ_ρ h[.., J·R + j·R + ρ] · B[m, c, ρ]`` to the same accumulator before its
one write of ``y``. ``m = -1``: nothing to subtract.

``UPCAST`` (interpreter only) multiplies in fp32 after the same rounding: Triton's CPU interpreter
cannot multiply bf16 blocks.

Programmatic dependent launch (``PDL`` > 0; Hopper, launched with ``launch_pdl``): each program
first lets the next kernel in the stream launch (``gdc_launch_dependents``), then reads only
what no kernel of the step writes (tile metadata, ranks, scales, the adapter weights) until
``gdc_wait`` — which returns once the previous kernel has completed and its writes are visible —
and reads ``x`` / ``h`` / ``y`` and writes ``h`` / ``y`` only after it. Every kernel waiting
before its first dependent access makes the chain safe transitively: a kernel completes only
after its own wait, i.e. after all kernels before it. Results are bit-identical to ``PDL`` = 0.
"""

# Kernel arguments are symbolic Triton values (pointers, scalars, blocks): no Python annotations.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import os

import triton
import triton.language as tl

GDC_AVAILABLE = False
"""Whether Triton's grid dependency control is compiled in (``PDL`` > 0 can run on a GPU)."""
if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
    try:  # programmatic dependent launch (Hopper+, Triton >= 3.4)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        GDC_AVAILABLE = True
    except ImportError:  # pragma: no cover - an older Triton: the launcher never sets PDL
        pass
if not GDC_AVAILABLE:
    # The CPU interpreter has no grid dependency control; there, and on a Triton without it, the
    # two are no-ops, so the ``PDL`` > 0 code paths still run (and are tested) in the
    # interpreter. Without a dependent launch both are no-ops on a GPU too.
    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


@triton.jit(do_not_specialize=["tile_stride", "num_rank_blocks", "split_k"])
def lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, ranks_ptr, sorted_ptr, tiles_ptr, corr_ptr,
    tile_stride, num_rank_blocks, split_k, k_split, split_stride,
    num_slices, in_features, max_rank, flat_rank, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    CORRECTION: tl.constexpr, PDL: tl.constexpr = 0,
):
    """``CORRECTION``: ``h`` rows are ``2·J·R`` wide — the tile's own slot on ``[0, J·R)``, the
    merged slot ``corr_ptr[0]`` on ``[J·R, 2·J·R)`` (module docstring of ``triton_lora``);
    tiles of slot -2 have only the second half. ``PDL`` > 0 (module docstring, "Programmatic
    dependent launch"): the next kernel may launch at once; ``x`` is read and ``h`` written only
    after the previous kernel has completed."""
    pid = tl.program_id(0)
    if PDL > 0:
        gdc_launch_dependents()
    rank_block = pid % num_rank_blocks
    rest = pid // num_rank_blocks
    split = rest % split_k
    tile = rest // split_k
    slot = tl.load(tiles_ptr + tile)
    offs_n = rank_block * BLOCK_N + tl.arange(0, BLOCK_N)
    if CORRECTION:
        if slot == -1:
            return
        h_width = 2 * flat_rank
        second = offs_n >= flat_rank
        n_local = tl.where(second, offs_n - flat_rank, offs_n)
        slot_n = tl.where(second, tl.load(corr_ptr), slot)
        in_flat = (offs_n < h_width) & (slot_n >= 0)
    else:
        if slot < 0:
            return
        h_width = flat_rank
        n_local = offs_n
        slot_n = slot
        in_flat = offs_n < flat_rank
    slice_of_n = n_local // max_rank
    rank_of_n = tl.load(ranks_ptr + slot_n * num_slices + slice_of_n, mask=in_flat, other=0)
    n_valid = in_flat & (n_local - slice_of_n * max_rank < tl.minimum(rank_of_n, max_rank))
    if tl.max(n_valid.to(tl.int32), axis=0) == 0:
        return
    row_start = tl.load(tiles_ptr + tile_stride + tile)
    num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
    offs_m = tl.arange(0, BLOCK_M)
    # Rows past the tile re-read its last row (always valid memory); their results are not stored.
    tokens = tl.load(sorted_ptr + row_start + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = tl.multiple_of(split * k_split, BLOCK_K)  # k_split is a multiple of BLOCK_K
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + (k_begin + offs_k)[None, :]
    if CORRECTION:  # a row of A per column, from either slot
        a_cols = (slot_n.to(tl.int64) * flat_rank + n_local.to(tl.int64)) * in_features
        a_ptrs = a_ptr + a_cols[None, :] + (k_begin + offs_k)[:, None]
    else:
        a_base = a_ptr + slot.to(tl.int64) * flat_rank * in_features
        a_ptrs = a_base + offs_n[None, :].to(tl.int64) * in_features + (k_begin + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PDL > 0:
        gdc_wait()
    for k in range(0, k_split, BLOCK_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs)
            a_tile = tl.load(a_ptrs, mask=n_valid[None, :], other=0.0)
        else:
            k_ok = k_begin + k + offs_k < in_features
            x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            a_tile = tl.load(a_ptrs, mask=n_valid[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        acc = tl.dot(x_tile, a_tile, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    h_ptrs = (h_ptr + split * split_stride
              + (row_start + offs_m)[:, None].to(tl.int64) * h_width + offs_n[None, :])
    tl.store(h_ptrs, acc, mask=(offs_m < num_rows)[:, None] & (offs_n < h_width)[None, :])


@triton.jit
def _expand_chunk(acc, h_rows, b_cols, k, rank, split_k, split_stride, scale, m_ok, n_ok,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                  MASK_K: tl.constexpr, MASK_B_K: tl.constexpr, B_ALIGN: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  B_RANK_MAJOR: tl.constexpr = False, b_rank_stride=1,
                  B_GIVEN: tl.constexpr = False, b_given=None):
    """``acc += (Σ_split h[:, k:k+BLOCK_K] · scale) · B[k:k+BLOCK_K, :]``; ``MASK_K`` for the
    rank tail (a mask along the contiguous rank axis would stop vectorised loads elsewhere).
    In the tail, ``h`` is always masked above the rank (its padding is never written); ``B`` only
    with ``MASK_B_K``: without it the chunk loads ``B``'s storage padding whole — in bounds when
    the storage rank is a multiple of ``BLOCK_K``, finite by the storage contract (``valora.ops.
    lora``), and multiplied by the zeros of ``h`` — so its loads stay 16 bytes wide (masked along
    the rank they were 2-byte loads: the whole work of a rank-8 adapter at decode tiles).
    ``B_ALIGN`` > 1 (a storage rank that is a multiple of it) masks ``B`` at the rank rounded up
    to a multiple of ``B_ALIGN``: the compiler sees the mask constant over ``B_ALIGN`` elements,
    so the loads stay 16 bytes wide while a wide chunk (``BLOCK_K`` = the storage rank: one load,
    no rank loop) reads at most ``B_ALIGN - 1`` padding columns of a low-rank adapter instead of
    the whole chunk.

    ``SPLIT_K`` > 0 (= ``split_k``) unrolls the split sum: its loads are independent and issue
    together. A run-time loop issues them one after another, one L2 round trip each (split_k ×
    rank chunks of them per program): in the first H200 table the T=1 expand cost 15.6 µs at
    rank 128 against 4.4 µs at rank 16 with the same split of 32. Unrolled, the software
    pipeliner stages every plane's tile in shared memory, so the launcher unrolls only when
    ``split_k × BLOCK_M × BLOCK_K × 4 B × stages`` fits its budget (``SPLIT_K`` = 0: run-time
    loop).

    ``B_GIVEN``: ``b_given`` is the chunk's ``B`` tile, loaded earlier by ``_expand_b_tile`` (the
    expand's ``PDL`` = 2); nothing else changes. The ``h`` loads stay ahead of the ``B`` load:
    ``B`` first made the 32-adapter decode step ≈ 1 ms slower on an H200 (``bench/ops/NOTES.md``,
    session 12)."""
    offs_k = k + tl.arange(0, BLOCK_K)
    if MASK_K:  # noqa: SIM108 (a compile-time branch)
        h_mask = m_ok[:, None] & (offs_k < rank)[None, :]
    else:
        h_mask = m_ok[:, None]
    b_mask = _expand_b_mask(offs_k, rank, n_ok, MASK_K, MASK_B_K, B_ALIGN)
    h_tile = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if SPLIT_K > 0:
        for split in tl.static_range(SPLIT_K):
            h_tile += tl.load(h_rows + split * split_stride + offs_k[None, :], mask=h_mask,
                              other=0.0)
    else:
        for split in range(0, split_k):
            h_tile += tl.load(h_rows + split * split_stride + offs_k[None, :], mask=h_mask,
                              other=0.0)
    if B_GIVEN:
        b_tile = b_given
    else:
        b_tile = _expand_b_load(b_cols, offs_k, b_mask, B_RANK_MAJOR, b_rank_stride)
    h_tile = (h_tile * scale).to(b_tile.dtype)
    if UPCAST:
        h_tile = h_tile.to(tl.float32)
        b_tile = b_tile.to(tl.float32)
    return tl.dot(h_tile, b_tile, acc, input_precision=PRECISION)


@triton.jit
def _expand_b_mask(offs_k, rank, n_ok, MASK_K: tl.constexpr, MASK_B_K: tl.constexpr,
                   B_ALIGN: tl.constexpr):
    """The mask of a rank chunk's ``B`` tile (``_expand_chunk``'s docstring)."""
    if MASK_K:
        if MASK_B_K:
            if B_ALIGN > 1:  # noqa: SIM108 (a compile-time branch)
                rank_b = (rank + B_ALIGN - 1) // B_ALIGN * B_ALIGN
            else:
                rank_b = rank
            b_mask = (offs_k < rank_b)[:, None] & n_ok[None, :]
        else:
            b_mask = n_ok[None, :]
    else:
        b_mask = n_ok[None, :]
    return b_mask


@triton.jit
def _expand_b_load(b_cols, offs_k, b_mask, B_RANK_MAJOR: tl.constexpr, b_rank_stride):
    """A ``B`` tile: ranks ``offs_k`` × the columns of ``b_cols``, in either storage layout."""
    if B_RANK_MAJOR:  # rank ρ's columns lie ``b_rank_stride`` (= the output width) apart
        return tl.load(b_cols + offs_k[:, None] * b_rank_stride, mask=b_mask, other=0.0)
    return tl.load(b_cols + offs_k[:, None], mask=b_mask, other=0.0)


@triton.jit
def _expand_b_tile(b_cols, k, rank, n_ok, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr,
                   MASK_B_K: tl.constexpr, B_ALIGN: tl.constexpr,
                   B_RANK_MAJOR: tl.constexpr = False, b_rank_stride=1):
    """The ``B`` tile of rank chunk ``[k, k + BLOCK_K)`` with ``_expand_chunk``'s masks, loaded
    apart from its dot (``PDL`` = 2: before the grid-dependency wait)."""
    offs_k = k + tl.arange(0, BLOCK_K)
    b_mask = _expand_b_mask(offs_k, rank, n_ok, MASK_K, MASK_B_K, B_ALIGN)
    return _expand_b_load(b_cols, offs_k, b_mask, B_RANK_MAJOR, b_rank_stride)


@triton.jit
def _pick(index, v0, v1, v2, v3):
    """``(v0, v1, v2, v3)[index]`` for a scalar ``index`` in [0, 4)."""
    return tl.where(index == 0, v0, tl.where(index == 1, v1, tl.where(index == 2, v2, v3)))


@triton.jit
def _expand_columns(group, col_block, blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3,
                    col_4, BLOCK_N: tl.constexpr):
    """The output columns of column block ``col_block`` of launch-group slice ``group`` (an
    expand work item) and their in-slice mask."""
    first_block = _pick(group, 0, blocks_1, blocks_2, blocks_3)
    col_begin = _pick(group, col_0, col_1, col_2, col_3)
    col_end = _pick(group, col_1, col_2, col_3, col_4)
    offs_n = col_begin + (col_block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < col_end


@triton.jit(do_not_specialize=["tile_stride", "num_col_blocks", "split_k",
                               "blocks_1", "blocks_2", "blocks_3", "slice_base"])
def lora_expand_kernel(
    h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr, corr_ptr,
    tile_stride, num_col_blocks, split_k, split_stride,
    blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, max_rank, flat_rank, out_features, stride_ym, scale_multiplier,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, CORRECTION: tl.constexpr,
    MASK_B_K: tl.constexpr = True, EARLY_Y: tl.constexpr = False, B_ALIGN: tl.constexpr = 1,
    PDL: tl.constexpr = 0, B_RANK_MAJOR: tl.constexpr = False,
):
    """Up to four slices per launch: slice ``g`` owns column blocks ``[blocks_g, blocks_{g+1})``
    (``blocks_0 = 0``) and columns ``[col_g, col_{g+1})`` of ``y``; ``slice_base`` is the index
    of the launch's first slice. ``CORRECTION``: the same program also subtracts the merged slot
    ``corr_ptr[0]``'s term, read from the second half of ``h``'s ``2·J·R``-wide rows, and adds
    both terms to ``y`` in one read-modify-write; tiles of slot -2 have only that term.

    ``EARLY_Y`` issues the ``y`` tile's load before the rank loop, so its HBM latency overlaps
    the ``h``/``B`` loads and the dots instead of following them (at large T the expand streams
    ``y``; the late load left it at ≈ 1.8 TB/s on an H200). It holds the tile in registers
    across the loop (more registers a thread, fewer programs an SM), so it is a tile choice.

    ``PDL`` > 0 (module docstring, "Programmatic dependent launch"): the next kernel may launch
    at once; ``h`` and ``y`` are read only after the previous kernel has completed. ``PDL`` = 2
    also loads the first rank chunk's ``B`` tile (a weight) before that wait, so its HBM read
    overlaps the end of the previous kernel (the shrink that writes ``h``).

    ``B_RANK_MAJOR``: ``B`` is stored rank-major (``valora.ops.lora``: element ``[s, c, ρ]`` at
    ``(s·R + ρ)·out + c``) instead of ``(s·out + c)·R + ρ``; the tile loads run along the
    columns, so masking the rank axis costs them nothing."""
    pid = tl.program_id(0)
    if PDL > 0:
        gdc_launch_dependents()
    col_block = pid % num_col_blocks
    tile = pid // num_col_blocks
    slot = tl.load(tiles_ptr + tile)
    if CORRECTION:
        if slot == -1:
            return
    else:
        if slot < 0:
            return
    group = ((col_block >= blocks_1).to(tl.int32) + (col_block >= blocks_2).to(tl.int32)
             + (col_block >= blocks_3).to(tl.int32))
    slice_id = slice_base + group
    own = tl.maximum(slot, 0)  # slot -2 (correction only) reads slot 0's entries, unused
    rank = tl.minimum(tl.load(ranks_ptr + own * num_slices + slice_id), max_rank)
    if CORRECTION:
        rank = tl.where(slot >= 0, rank, 0)
        corr_slot = tl.load(corr_ptr)
        merged = tl.maximum(corr_slot, 0)
        rank_c = tl.minimum(tl.load(ranks_ptr + merged * num_slices + slice_id), max_rank)
        rank_c = tl.where(corr_slot >= 0, rank_c, 0)
        if (rank <= 0) & (rank_c <= 0):
            return
        h_width = 2 * flat_rank
    else:
        if rank <= 0:
            return
        h_width = flat_rank
    scale = tl.load(scales_ptr + own * num_slices + slice_id) * scale_multiplier
    offs_n, n_ok = _expand_columns(group, col_block, blocks_1, blocks_2, blocks_3, col_0, col_1,
                                   col_2, col_3, col_4, BLOCK_N)
    row_start = tl.load(tiles_ptr + tile_stride + tile)
    num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_rows
    h_rows = h_ptr + (row_start + offs_m)[:, None].to(tl.int64) * h_width + slice_id * max_rank
    if B_RANK_MAJOR:
        b_cols = b_ptr + own.to(tl.int64) * out_features * max_rank + offs_n[None, :]
    else:
        b_cols = (b_ptr + own.to(tl.int64) * out_features * max_rank
                  + offs_n[None, :].to(tl.int64) * max_rank)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PDL == 2:  # the first chunk, whole or tail (masked as a tail: exact for both)
        b_first = _expand_b_tile(b_cols, 0, rank, n_ok, BLOCK_K, True, MASK_B_K, B_ALIGN,
                                 B_RANK_MAJOR, out_features)
    if PDL > 0:
        gdc_wait()
    if EARLY_Y:
        tokens = tl.load(sorted_ptr + row_start + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
        y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
        y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = 0
    if PDL == 2:
        acc = _expand_chunk(acc, h_rows, b_cols, 0, rank, split_k, split_stride, scale, m_ok,
                            n_ok, BLOCK_M, BLOCK_K, SPLIT_K, True, MASK_B_K, B_ALIGN, PRECISION,
                            UPCAST, B_RANK_MAJOR, out_features, True, b_first)
        start = BLOCK_K
    full = rank // BLOCK_K * BLOCK_K
    for k in range(start, full, BLOCK_K):  # whole rank chunks: no mask along the contiguous axis
        acc = _expand_chunk(acc, h_rows, b_cols, k, rank, split_k, split_stride, scale, m_ok,
                            n_ok, BLOCK_M, BLOCK_K, SPLIT_K, False, False, B_ALIGN, PRECISION,
                            UPCAST, B_RANK_MAJOR, out_features)
    if PDL == 2:  # noqa: SIM108 (a compile-time branch)
        tail = (full < rank) & (full >= start)  # the first chunk may have been the tail
    else:
        tail = full < rank
    if tail:
        acc = _expand_chunk(acc, h_rows, b_cols, full, rank, split_k, split_stride, scale, m_ok,
                            n_ok, BLOCK_M, BLOCK_K, SPLIT_K, True, MASK_B_K, B_ALIGN,
                            PRECISION, UPCAST, B_RANK_MAJOR, out_features)
    if CORRECTION:  # minus the merged adapter's term, same rows and columns
        scale_c = -tl.load(scales_ptr + merged * num_slices + slice_id) * scale_multiplier
        h_rows_c = h_rows + flat_rank
        if B_RANK_MAJOR:
            b_cols_c = b_ptr + merged.to(tl.int64) * out_features * max_rank + offs_n[None, :]
        else:
            b_cols_c = (b_ptr + merged.to(tl.int64) * out_features * max_rank
                        + offs_n[None, :].to(tl.int64) * max_rank)
        full_c = rank_c // BLOCK_K * BLOCK_K
        for k in range(0, full_c, BLOCK_K):
            acc = _expand_chunk(acc, h_rows_c, b_cols_c, k, rank_c, split_k, split_stride,
                                scale_c, m_ok, n_ok, BLOCK_M, BLOCK_K, SPLIT_K, False, False,
                                B_ALIGN, PRECISION, UPCAST, B_RANK_MAJOR, out_features)
        if full_c < rank_c:
            acc = _expand_chunk(acc, h_rows_c, b_cols_c, full_c, rank_c, split_k, split_stride,
                                scale_c, m_ok, n_ok, BLOCK_M, BLOCK_K, SPLIT_K, True, MASK_B_K,
                                B_ALIGN, PRECISION, UPCAST, B_RANK_MAJOR, out_features)
    if not EARLY_Y:
        tokens = tl.load(sorted_ptr + row_start + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
        y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
        y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=out_mask)
