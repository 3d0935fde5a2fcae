"""Would a GEMV expand (no ``tl.dot``) serve a decode step's LoRA better? A measurement, not a feature.

At a decode step with many adapters each tile holds one or a few tokens, yet the shipped expand
(``lora_kernels.lora_expand_kernel``) runs a 16-row ``tl.dot`` a rank chunk: its ``B`` tile goes
through shared memory into the MMA layout, and wider rank chunks lose (session 11:
``bench/results/ops/whole-rank-h200-2b84dc9/``, a whole-rank chunk 1.5–2× slower at 32
adapters). ``_expand_gemv`` below loads the program's whole ``B`` block (every rank of the slot
at once, ``BLOCK_R`` ≥ the storage rank, masked at the adapter's rank) into registers, then, for
each token of the tile in turn, sums ``h[p, ρ] · B[ρ, c]`` over the rank axis with ``tl.sum``
and does the token's ``y`` read-modify-write — no shared memory, no padded rows, ``B`` read once
for all of the tile's tokens. Both ``B`` layouts: the shipped ``[slots, out, R]`` (rank
contiguous; masked at the rank rounded up to 8, its finite padding meeting zeros of ``h``) and
rank-major ``[slots, R, out]``. Same scenarios, widths and weights rotation as
``decode_tiles.py``; every output is checked against the shipped expand first; the shipped
expand under the table's tile and the best dot tile of the session-11 sweep are timed in the
same run.

    python bench/ops/expand_gemv.py --out $OUT/expand_gemv.jsonl [--sha SHA] [--tiny]
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
from valora.ops.lora_launch_args import slice_groups
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ExpandConfig, next_power_of_2
from valora.ops.timing import time_calls
from valora.ops.triton_lora import choose_tile_config, launch_expand, launch_shrink

GEMV_TILES = ((64, 2), (128, 4), (128, 2), (256, 4), (256, 8), (512, 8), (32, 1), (64, 1))
"""(``BLOCK_N``, warps) of the GEMV expand."""
DOT_TILES = ((16, 128, 16, 4, 1), (16, 256, 16, 4, 1), (16, 128, 32, 4, 1))
"""The shipped expand's best tiles at these points in the session-11 sweep."""


@triton.jit(do_not_specialize=["tile_stride", "num_col_blocks", "split_k",
                               "blocks_1", "blocks_2", "blocks_3", "slice_base"])
def _expand_gemv(
    h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_col_blocks, split_k, split_stride,
    blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4, slice_base,
    num_slices, max_rank, flat_rank, out_features, stride_ym, scale_multiplier,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, RANK_MAJOR: tl.constexpr,
):
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
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    b_base = b_ptr + slot.to(tl.int64) * max_rank * out_features
    if RANK_MAJOR:
        b = tl.load(b_base + offs_r[:, None].to(tl.int64) * out_features + offs_n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    else:
        rank8 = (rank + 7) // 8 * 8
        b = tl.load(b_base + offs_n[None, :].to(tl.int64) * max_rank + offs_r[:, None],
                    mask=(offs_r < rank8)[:, None] & n_ok[None, :], other=0.0)
    b32 = b.to(tl.float32)
    for m in range(0, num_rows):
        p = row_start + m
        h_row = h_ptr + p.to(tl.int64) * flat_rank + slice_id * max_rank + offs_r
        h = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for split in range(0, split_k):
            h += tl.load(h_row + split * split_stride, mask=r_ok, other=0.0)
        h = (h * scale).to(b.dtype).to(tl.float32)  # the shipped expand's rounding of h
        contrib = tl.sum(b32 * h[:, None], axis=0)
        token = tl.load(sorted_ptr + p).to(tl.int64)
        y_ptrs = y_ptr + token * stride_ym + offs_n
        y_row = tl.load(y_ptrs, mask=n_ok, other=0.0)
        tl.store(y_ptrs, (y_row.to(tl.float32) + contrib).to(y_row.dtype), mask=n_ok)


def launch_gemv(h: torch.Tensor, y: torch.Tensor, b: torch.Tensor, weights: Any,
                segments: LoRASegments, block_n: int, warps: int, rank_major: bool) -> None:
    split_k, num_tokens, width = h.shape
    widths = weights.slice_widths
    flat_rank = len(widths) * weights.max_rank
    bound = segments.tile_bound(16)
    for first, num_col_blocks, starts, cols in slice_groups(widths, block_n):
        _expand_gemv[(bound * num_col_blocks,)](
            h, b, y, weights.ranks, weights.scales, segments.sorted_tokens,
            segments.tile_list(16), segments.tile_capacity, num_col_blocks, split_k,
            num_tokens * width, *starts, *cols, first, len(widths), weights.max_rank, flat_rank,
            sum(widths), y.stride(0), 1.0,
            BLOCK_N=block_n, BLOCK_R=next_power_of_2(weights.max_rank), RANK_MAJOR=rank_major,
            num_warps=warps, num_stages=1)


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
                           "expand_floor_us": problem.nbytes / rate * 1e6, "us": {}, "errors": {}}
    variants: list[tuple[str, Any]] = [("dot table", lambda h, out, i: launch_expand(
        h, out, weights[i], segments, table.expand, 1.0))]
    for m, n, k, w, st in DOT_TILES:
        cfg = ExpandConfig(m, n, k, w, st)
        variants.append((f"dot {m}x{n}x{k} w{w} s{st}", lambda h, out, i, c=cfg: launch_expand(
            h, out, weights[i], segments, c, 1.0)))
    gemv = GEMV_TILES[:2] if device.type == "cpu" else GEMV_TILES  # interpreter: correctness
    for block_n, warps in gemv:
        for major in (False, True):
            label = f"gemv {'rank' if major else 'column'}-major n{block_n} w{warps}"
            variants.append((label, lambda h, out, i, n=block_n, w=warps, r=major: launch_gemv(
                h, out, rank_major[i] if r else weights[i].lora_b, weights[i], segments, n, w,
                r)))
    for label, launch in variants:
        if not output_ok(row["errors"], label, lambda out, f=launch: f(hs[0], out, 0), y, shipped,
                         2e-2, "the shipped expand"):
            continue
        work = y.clone()
        timing = time_calls([lambda i=i, f=launch, w=work: f(hs[i], w, i) for i in range(copies)],
                            device, repeats=10)
        row["us"][label] = timing.median_us
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return {kind: best_of(row["us"], kind)
            for kind in ("dot", "gemv column-major", "gemv rank-major")}


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "expand_floor_us")
