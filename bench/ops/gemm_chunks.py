"""The LoRA expand in the base GEMM's reduction loop, over a flat per-step chunk list. (Session 16.)

Session 15's ``gemm_expand.py`` let the skinny GEMM keep accumulating over the batch's slot tiles
after its ``W`` loop — ``y = x Wᵀ + Σ_tiles (H_tile · scale) B_slot`` — and measured ≈ 3 µs per
tile in every program: each loop step walked a chain of dependent loads (tile list → slot →
rank / scale → ``B`` / ``h``) that Triton's pipeliner did not overlap (``bench/ops/NOTES.md``,
session 15). What it left to try: lay the work out per step as a flat list of chunks, so a loop
step's addresses come from loads of the loop index alone. Here every chunk is ``BLOCK_R`` rank
rows of one active slot, with its ``B`` offset, its ``h`` column, its rows (the slot's segment in
the sorted order), its valid rank rows and its scale (per slice) in flat arrays: chunk ``c`` loads
``arrays[c]`` (depth 1), then ``B`` and ``h`` (depth 2) — the paged-attention block-table pattern
the pipeliner stages. ``B``'s rows beyond an adapter's rank are zero in the slots (the slot writer
zeroes a slot before it copies) and ``h`` is masked there, so the ``B`` loads stay unmasked along
the rank (16 bytes wide).

Per scenario × layer of the model benchmark's decode step (``decode_tiles.py``'s problem), under
CUDA graphs: ``skinny``, ``skinny+atmm`` (serial), ``overlap`` (the engine's side-stream path),
``shrink+chunks`` (the ATMM shrink, then this kernel: ``BLOCK_R`` × loop stages) and ``pdl`` (the
same with the kernel a programmatic dependent of the shrink: it streams ``W`` while the shrink
finishes). Outputs are checked against ``skinny+atmm`` first. The chunk arrays are built once per
point on the host (``chunk_list``), outside the timing: in the engine they would be built once a
step for every layer of the same ranks.

    PYTHONPATH=$PWD:$PWD/bench/ops python bench/ops/gemm_chunks.py --out $OUT/gemm_chunks.jsonl [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from dataclasses import dataclass
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
from gemm_expand import _base_part

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_segments import LoRASegments
from valora.ops.pdl import pdl_supported
from valora.ops.skinny_gemm import SkinnyTile
from valora.ops.tile_config import BLOCK_M_CHOICES
from valora.ops.triton_lora import dot_flags, launch_shrink

BLOCK_RS = (16, 32)
STAGES = (1, 2, 3, 4)


@dataclass
class ChunkList:
    """One step's chunks on the device: ``count`` (``[1]`` int32) chunks, each ``BLOCK_R`` rank
    rows of one slot — ``b_offset`` (int64, its first element in rank-major ``B``),
    ``h_offset`` (its first rank), ``lo`` / ``hi`` (its slot's rows in the sorted order), ``valid``
    (rank rows below the adapter's rank) — and ``scale`` (``[slices, capacity]`` fp32)."""

    count: torch.Tensor
    b_offset: torch.Tensor
    h_offset: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor

    @property
    def capacity(self) -> int:
        return int(self.b_offset.shape[0])


def chunk_list(weights: LoRASlotWeights, segments: LoRASegments, block_m: int,
               block_r: int) -> ChunkList:
    """The chunks of a step's tiles of ``block_m`` rows (one tile a slot) at ``weights``' ranks
    (every slice's: the widest of them, the narrower masked by ``valid`` per slice would need a
    per-slice list — the benchmark's slots have one rank for all slices)."""
    tiles = segments.tile_list(block_m).cpu()
    ranks = weights.ranks.cpu()
    scales = weights.scales.cpu()
    out_features, storage = sum(weights.slice_widths), weights.max_rank
    entries: list[tuple[int, int, int, int, int]] = []
    slots: list[int] = []
    for slot, start, rows in zip(*(tiles[i].tolist() for i in range(3)), strict=True):
        if slot < 0 or rows <= 0:
            continue
        rank = int(ranks[slot].max())
        assert bool((ranks[slot] == rank).all()), "one rank for every slice (docstring)"
        for first in range(0, min(rank, storage), block_r):
            entries.append(((slot * storage + first) * out_features, first, start, start + rows,
                            min(block_r, rank - first)))
            slots.append(slot)
    device = weights.lora_b.device
    capacity = max(1, len(entries))
    cols = list(zip(*entries, strict=True)) if entries else [[0]] * 5
    scale = torch.zeros(len(weights.slice_widths), capacity, dtype=torch.float32)
    for c, slot in enumerate(slots):
        scale[:, c] = scales[slot]
    return ChunkList(
        count=torch.tensor([len(entries)], dtype=torch.int32, device=device),
        b_offset=torch.tensor(cols[0], dtype=torch.int64, device=device),
        h_offset=torch.tensor(cols[1], dtype=torch.int32, device=device),
        lo=torch.tensor(cols[2], dtype=torch.int32, device=device),
        hi=torch.tensor(cols[3], dtype=torch.int32, device=device),
        valid=torch.tensor(cols[4], dtype=torch.int32, device=device),
        scale=scale.to(device))


@triton.jit
def _gemm_chunks(x_ptr, w_ptr, y_ptr, h_ptr, b_ptr, sorted_ptr, count_ptr, boff_ptr, hoff_ptr,
                 lo_ptr, hi_ptr, valid_ptr, scale_ptr, M, N, K, stride_xm, stride_wn,
                 stride_ym, split_stride, h_width, max_rank, capacity, col_1, col_2, col_3,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, LORA_STAGES: tl.constexpr,
                 PDL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``y[t, cols] = x[t] Wᵀ[:, cols] + Σ_chunks (h · scale) B`` for one block of columns (in
    one slice) and every row, rows taken in the sorted order."""
    rm, rn, m_ok, n_ok, tokens, acc, slice_id = _base_part(
        x_ptr, w_ptr, sorted_ptr, M, N, K, stride_xm, stride_wn, col_1, col_2, col_3,
        BLOCK_M, BLOCK_N, BLOCK_K, PDL, PRECISION, UPCAST)
    count = tl.load(count_ptr)
    rr = tl.arange(0, BLOCK_R)
    h_rows = h_ptr + rm[:, None].to(tl.int64) * h_width + slice_id * max_rank
    b_cols = b_ptr + rn[None, :] + rr[:, None].to(tl.int64) * N
    for c in tl.range(0, count, num_stages=LORA_STAGES):
        b_offset = tl.load(boff_ptr + c)
        h_offset = tl.load(hoff_ptr + c)
        lo = tl.load(lo_ptr + c)
        hi = tl.load(hi_ptr + c)
        valid = tl.load(valid_ptr + c)
        scale = tl.load(scale_ptr + slice_id * capacity + c)
        b = tl.load(b_cols + b_offset, mask=n_ok[None, :], other=0.0)
        h_mask = ((rm >= lo) & (rm < hi))[:, None] & (rr < valid)[None, :]
        hv = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for sp in tl.static_range(SPLIT_K):
            hv += tl.load(h_rows + sp * split_stride + h_offset + rr[None, :], mask=h_mask,
                          other=0.0)
        hv = (hv * scale).to(b.dtype)
        if UPCAST:
            hv = hv.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(hv, b, acc, input_precision=PRECISION)
    tl.store(y_ptr + tokens[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemm_chunks(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, weights: LoRASlotWeights,
                segments: LoRASegments, chunks: ChunkList, tile: SkinnyTile, block_r: int,
                stages: int, pdl: bool) -> torch.Tensor:
    """``x Wᵀ + LoRA`` from the shrink's ``h`` over ``chunks`` (rank-major ``B``)."""
    assert weights.b_rank_major and segments.correction is None
    assert weights.max_rank % block_r == 0
    num_tokens, in_features = x.shape
    widths = weights.slice_widths
    assert len(widths) <= 4 and all(width % tile.block_n == 0 for width in widths)
    split_k, _, h_width = h.shape
    cols = slice_ends(widths)
    y = torch.empty(num_tokens, w.shape[0], dtype=x.dtype, device=x.device)
    _gemm_chunks[(triton.cdiv(w.shape[0], tile.block_n),)](
        x, w, y, h, weights.lora_b, segments.sorted_tokens, chunks.count, chunks.b_offset,
        chunks.h_offset, chunks.lo, chunks.hi, chunks.valid, chunks.scale, num_tokens,
        w.shape[0], in_features, x.stride(0), w.stride(0), y.stride(0), num_tokens * h_width,
        h_width, weights.max_rank, chunks.capacity, *cols,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, BLOCK_R=block_r,
        SPLIT_K=split_k, LORA_STAGES=stages, PDL=int(pdl), **dot_flags(x.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
        **({"launch_pdl": True} if pdl else {}))
    return y


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    point = gemm_point(scenario, layer, layers, device, tokens, dtype)
    problem, lora, base = point.problem, point.lora, point.base
    weights, x, copies = problem.weights, problem.x, problem.copies
    tile, gc_tile = gemm_tiles(point, device, tokens, x.element_size())
    block_m = next(m for m in BLOCK_M_CHOICES if m >= tokens)   # one tile per slot
    lists = {r: [chunk_list(w, lora.segments, block_m, r) for w in weights] for r in BLOCK_RS
             if weights[0].max_rank % r == 0}

    def fused(out: torch.Tensor, i: int, block_r: int, stages: int, pdl: bool) -> None:
        h = launch_shrink(x, weights[i % copies], lora.segments, lora.tiles.shrink,
                          pdl=int(pdl), pdl_launch=False)
        out.copy_(gemm_chunks(x, base[i % len(base)], h, weights[i % copies], lora.segments,
                              lists[block_r][i % copies], gc_tile, block_r, stages, pdl))

    variants = gemm_baselines(point, tile, device)
    choices = ([(16, 2)] if device.type == "cpu" else
               [(r, s) for r in lists for s in STAGES])
    for block_r, stages in choices:
        for pdl in (False, True) if pdl_supported(device) else (False,):
            name = "pdl" if pdl else "shrink+chunks"
            variants.append((f"{name} r{block_r} s{stages}", lambda out, i, r=block_r,
                             s=stages, p=pdl: fused(out, i, r, s, p)))
    row = point.row(scenario, layer, tokens, rate)
    row["chunks"] = {str(r): int(lists[r][0].count.item()) for r in lists}
    return point.check_and_time(row, tile, variants, dtype, device)


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return best_columns(row, ("skinny", "skinny+atmm", "overlap", "shrink+chunks", "pdl"))


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "lora_floor_us")
