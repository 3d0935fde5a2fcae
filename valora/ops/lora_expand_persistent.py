"""The expand as a persistent, software-pipelined loop (``ExpandConfig.persistent`` > 0).

``lora_kernels.lora_expand_kernel`` runs one program a work item — a (tile of one adapter's
rows, column block) pair — which loads ``h`` and ``B``, runs its dot, then loads, adds and stores
its ``y`` tile: one pass with nothing to overlap inside it, latency hidden only by other resident
programs. Here a grid of ``persistent`` programs an SM walks the items ``pid, pid + grid, …`` in
a ``tl.range(..., num_stages=S)`` loop, so the pipeliner issues the next item's loads while the
current one computes. The rank loop is unrolled over the storage rank's chunks
(``tl.static_range``, masked at the slot's rank — no run-time inner loop to stop the outer
pipelining), and dead items (padding tiles, slots without rank in the slice) are masked rather
than returned from.

Measured on an H200 (``bench/results/ops/persistent-expand-large-h200-b33a1a9/``): at 16384
tokens with rank 64 (uniform or mixed) the best variant (128×256×32, 8 warps, one program an
SM, 2 stages) took the expand 1.04–1.40× faster than the one-item kernel with the table's tiles,
under 2× its bytes floor at q / qkv / gate_up / down; at rank 16, at 4096 tokens and at decode
sizes it was slower (``persistent_expand.py``, session 16) — hence only a tuner choice for
buckets of ≥ ``tile_candidates.PERSISTENT_MIN_TOKENS`` tokens.

Semantics are the one-item kernel's without the mixed-mode correction: ``y[t, slice j] += mult ·
scale[slot, j] · Σ_split h[split, t, j] · B[slot, slice j]ᵀ`` over rank-major ``B``; the launcher
(``triton_lora.launch_expand``) sends correction batches and the column layout to the one-item
kernel.
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from valora.ops.launch import launcher
from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_kernels import _expand_chunk, _expand_columns
from valora.ops.lora_launch_args import (
    persistent_expand_serves,
    persistent_split_constexpr,
    slice_groups,
)
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ExpandConfig


@triton.jit(do_not_specialize=["tile_stride", "num_items", "num_col_blocks", "blocks_1",
                               "blocks_2", "blocks_3", "slice_base"])
def lora_expand_persistent_kernel(
    h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_items, num_col_blocks, split_k, split_stride,
    blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, max_rank, flat_rank, out_features, stride_ym, scale_multiplier,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, STAGES: tl.constexpr,
):
    """Work items ``pid, pid + grid, …`` of ``num_items`` = tiles × ``num_col_blocks`` (item =
    tile · ``num_col_blocks`` + column block, the one-item kernel's program order); module
    docstring."""
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
        scale = tl.load(scales_ptr + own * num_slices + slice_id) * scale_multiplier
        offs_n, n_ok = _expand_columns(group, col_block, blocks_1, blocks_2, blocks_3, col_0,
                                       col_1, col_2, col_3, col_4, BLOCK_N)
        row_start = tl.load(tiles_ptr + tile_stride + tile)
        num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
        num_rows = tl.where(rank > 0, num_rows, 0)  # a dead item writes nothing
        m_ok = offs_m < num_rows
        h_rows = (h_ptr + (row_start + offs_m)[:, None].to(tl.int64) * flat_rank
                  + slice_id * max_rank)
        b_cols = b_ptr + own.to(tl.int64) * out_features * max_rank + offs_n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for chunk in tl.static_range(CHUNKS):  # masked at the rank: no run-time inner loop
            acc = _expand_chunk(acc, h_rows, b_cols, chunk * BLOCK_K, rank, split_k,
                                split_stride, scale, m_ok, n_ok, BLOCK_M, BLOCK_K, SPLIT_K, True,
                                True, 1, PRECISION, UPCAST, True, out_features)
        tokens = tl.load(sorted_ptr + row_start + offs_m, mask=m_ok, other=0).to(tl.int64)
        y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
        tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=out_mask)


@lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 off CUDA: the interpreter runs a small grid)."""
    if device.type != "cuda":
        return 4
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def persistent_programs(device: torch.device, cfg: ExpandConfig, items: int) -> int:
    """The grid of one persistent launch: ``cfg.persistent`` programs an SM, at most one an
    item."""
    return max(1, min(items, cfg.persistent * num_sms(device)))


def launch_expand_persistent(h: torch.Tensor, y: torch.Tensor, weights: LoRASlotWeights,
                             segments: LoRASegments, cfg: ExpandConfig,
                             scale_multiplier: float, dot: dict[str, object]) -> None:
    """``y += mult · expand(h)`` (module docstring) for rank-major ``B`` without correction;
    ``dot``: the dtype's ``PRECISION`` / ``UPCAST`` constexprs (``triton_lora.dot_flags``)."""
    if not persistent_expand_serves(cfg, weights.b_rank_major, segments.correction is not None):
        raise ValueError("the persistent expand serves a persistent config over rank-major B "
                         "without the correction")
    split_k, num_tokens, width = h.shape
    widths = weights.slice_widths
    bound = segments.tile_bound(cfg.block_m)
    for first, num_col_blocks, starts, cols in slice_groups(widths, cfg.block_n):
        items = bound * num_col_blocks
        if items == 0:
            continue
        launcher(lora_expand_persistent_kernel)[(persistent_programs(y.device, cfg, items),)](
            h, weights.lora_b, y, weights.ranks, weights.scales, segments.sorted_tokens,
            segments.tile_list(cfg.block_m), segments.tile_capacity, items, num_col_blocks,
            split_k, num_tokens * width, *starts, *cols, first, len(widths), weights.max_rank,
            len(widths) * weights.max_rank, sum(widths), y.stride(0), float(scale_multiplier),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            CHUNKS=triton.cdiv(weights.max_rank, cfg.block_k),
            SPLIT_K=persistent_split_constexpr(split_k, cfg), **dot, STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
