"""Would a GEMV shrink (no ``tl.dot``) serve a decode step's LoRA better? A measurement, not a feature.

The companion of ``expand_gemv.py`` for the shrink: ``_shrink_gemv`` computes, for each token of
its tile in turn, ``h[split, p, n] = Σ_k x[t, k] · A[s, n, k]`` over its rank block and K split
with ``tl.sum`` over ``[BLOCK_N, BLOCK_K]`` register tiles of ``A`` (``K`` contiguous), instead of
the shipped shrink's 16-row ``tl.dot``; ``A`` is re-read (from L1 / L2) for the tile's later
tokens. Same scenarios, widths and weights rotation as ``decode_tiles.py``; every ``h`` is
checked against the shipped shrink on the entries the expand reads; the shipped shrink under the
table's tile and its best tiles of the session-10 sweep are timed in the same run.

    python bench/ops/shrink_gemv.py --out $OUT/shrink_gemv.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from decode_experiment import best_of, decode_problem, run_main

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ShrinkConfig
from valora.ops.timing import time_calls
from valora.ops.triton_lora import choose_tile_config, launch_shrink

# (BLOCK_N, BLOCK_K, split, warps)
GEMV_TILES = ((16, 256, 8, 2), (16, 256, 16, 2), (32, 256, 8, 4), (32, 256, 16, 4),
              (64, 128, 8, 4), (64, 128, 16, 4), (16, 512, 8, 4), (32, 512, 4, 4),
              (64, 256, 8, 8), (16, 128, 32, 2))
DOT_TILES = ((16, 64, 128, 8, 4, 3), (16, 16, 128, 16, 2, 2), (32, 32, 128, 16, 4, 3))
"""The shipped shrink's best tiles at these points in the session-10 sweep."""


@triton.jit(do_not_specialize=["tile_stride", "num_rank_blocks", "split_k"])
def _shrink_gemv(
    x_ptr, a_ptr, h_ptr, ranks_ptr, sorted_ptr, tiles_ptr,
    tile_stride, num_rank_blocks, split_k, k_split, split_stride,
    num_slices, in_features, max_rank, flat_rank, stride_xm,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rank_block = pid % num_rank_blocks
    rest = pid // num_rank_blocks
    split = rest % split_k
    tile = rest // split_k
    slot = tl.load(tiles_ptr + tile)
    if slot < 0:
        return
    offs_n = rank_block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_flat = offs_n < flat_rank
    slice_of_n = offs_n // max_rank
    rank_of_n = tl.load(ranks_ptr + slot * num_slices + slice_of_n, mask=in_flat, other=0)
    n_valid = in_flat & (offs_n - slice_of_n * max_rank < tl.minimum(rank_of_n, max_rank))
    if tl.max(n_valid.to(tl.int32), axis=0) == 0:
        return
    row_start = tl.load(tiles_ptr + tile_stride + tile)
    num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
    k_begin = split * k_split
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (a_ptr + slot.to(tl.int64) * flat_rank * in_features
              + offs_n[:, None].to(tl.int64) * in_features)
    for m in range(0, num_rows):
        p = row_start + m
        token = tl.load(sorted_ptr + p).to(tl.int64)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(0, k_split, BLOCK_K):
            ks = k_begin + k + offs_k
            k_ok = ks < in_features
            x_chunk = tl.load(x_ptr + token * stride_xm + ks, mask=k_ok, other=0.0)
            a_tile = tl.load(a_rows + ks[None, :], mask=n_valid[:, None] & k_ok[None, :],
                             other=0.0)
            acc += tl.sum(a_tile.to(tl.float32) * x_chunk.to(tl.float32)[None, :], axis=1)
        tl.store(h_ptr + split * split_stride + p.to(tl.int64) * flat_rank + offs_n, acc,
                 mask=in_flat)


def launch_gemv(x: torch.Tensor, weights: Any, segments: LoRASegments, block_n: int,
                block_k: int, split_k: int, warps: int) -> torch.Tensor:
    num_tokens, in_features = x.shape
    flat_rank = len(weights.slice_widths) * weights.max_rank
    split_k = max(1, min(split_k, -(-in_features // block_k)))
    per_split = -(-in_features // split_k)
    k_split = -(-per_split // block_k) * block_k
    h = torch.empty(split_k, num_tokens, flat_rank, dtype=torch.float32, device=x.device)
    num_rank_blocks = -(-flat_rank // block_n)
    grid = (segments.tile_bound(16) * split_k * num_rank_blocks,)
    _shrink_gemv[grid](
        x, weights.lora_a, h, weights.ranks, segments.sorted_tokens, segments.tile_list(16),
        segments.tile_capacity, num_rank_blocks, split_k, k_split, num_tokens * flat_rank,
        len(weights.slice_widths), in_features, weights.max_rank, flat_rank, x.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1)
    return h


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    _, widths = layers[layer]
    problem = decode_problem(scenario, layer, layers, device, tokens, dtype, "a")
    weights, x, token_slots, copies = problem.weights, problem.x, problem.token_slots, problem.copies
    batch = prepare_lora_batch(token_slots, problem.num_slots, "triton")
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments)
    table, source = choose_tile_config(x, weights[0], segments, None)
    reference = launch_shrink(x, weights[0], segments, table.shrink).sum(0)
    storage = weights[0].max_rank
    sorted_slots = token_slots[segments.sorted_tokens.long()].long()
    slot_rank = torch.tensor(problem.ranks, device=device)[sorted_slots]
    flat = torch.arange(len(widths) * storage, device=device)
    valid = (flat % storage)[None, :] < slot_rank[:, None]
    row: dict[str, Any] = {"scenario": scenario, "layer": layer, "tokens": tokens,
                           "table_source": source, "table": table.to_json(), "copies": copies,
                           "shrink_floor_us": problem.nbytes / rate * 1e6, "us": {}, "errors": {}}
    variants: list[tuple[str, Any]] = [
        ("dot table", lambda i: launch_shrink(x, weights[i], segments, table.shrink))]
    for m, n, k, s, w, st in DOT_TILES:
        cfg = ShrinkConfig(m, n, k, s, w, st)
        variants.append((f"dot {m}x{n}x{k} k{s} w{w} s{st}",
                         lambda i, c=cfg: launch_shrink(x, weights[i], segments, c)))
    gemv = GEMV_TILES[:2] if device.type == "cpu" else GEMV_TILES
    for n, k, s, w in gemv:
        variants.append((f"gemv n{n} k{k} split{s} w{w}", lambda i, n=n, k=k, s=s, w=w:
                         launch_gemv(x, weights[i], segments, n, k, s, w)))
    for label, launch in variants:
        try:
            got = launch(0).sum(0)
        except Exception as error:  # a config the GPU cannot run is a result
            row["errors"][label] = f"{type(error).__name__}: {error}"[:200]
            continue
        if not torch.allclose(got[valid], reference[valid], rtol=2e-2, atol=2e-2):
            row["errors"][label] = "differs from the shipped shrink"
            continue
        timing = time_calls([lambda i=i, f=launch: f(i) for i in range(copies)], device,
                            repeats=10)
        row["us"][label] = timing.median_us
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return {kind: best_of(row["us"], kind) for kind in ("dot", "gemv")}


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "shrink_floor_us")
