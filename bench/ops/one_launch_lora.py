"""Would the LoRA op in one launch (shrink and expand, a flag between them) cut the decode tax?
A measurement, not a feature.

At decode sizes every LoRA op is two dependent launches, and even an op with almost no bytes
(one adapter r16 at batch 32) costs ≈ 3.3 µs a launch in a graph replay
(``bench/results/ops/decode-tiles-h200-2114aa0/``): ≈ 128 ops × 2 launches a 7B decode step.
``_lora_one_launch`` below runs both halves in one grid: programs ``[0, S)`` are the shipped
shrink's programs, programs ``[S, S + E)`` the shipped expand's (non-correction paths, bodies
repeated here on purpose). Each shrink program, done with its ``h`` stores, passes a CTA barrier
and adds 1 to its tile's counter with release semantics; an expand program of a used tile spins
(acquire) until the counter reaches ``split_k × rank blocks`` before reading ``h`` — programs
start in pid order, so every shrink program is resident or finished by then (decoupled
look-back). The last expand program of a tile (second counter) zeroes both counters for the
next launch, so CUDA-graph replays need no host work. Both tile configs must share ``block_m``
(one tile list).

Same scenarios, widths and weights rotation as ``decode_tiles.py``; per scenario × layer the
shipped shrink + expand pair and the one-launch op are timed under the same tiles (the graph's
mix-entry tiles and the batch's own), each output checked against the shipped pair first and
again after the timed replays (the counters' reset).

    python bench/ops/one_launch_lora.py --out $OUT/one_launch.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from decode_experiment import decode_problem, output_ok, run_main

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_kernels import _pick
from valora.ops.lora_launch_args import shrink_split, slice_groups
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import TileConfig
from valora.ops.timing import time_calls
from valora.ops.triton_lora import (
    active_slice_ranks,
    choose_tile_config,
    dot_flags,
    launch_expand,
    launch_shrink,
)


@triton.jit(do_not_specialize=["tile_stride", "num_rank_blocks", "split_k", "num_shrink",
                               "num_col_blocks", "blocks_1", "blocks_2", "blocks_3"])
def _lora_one_launch(
    x_ptr, a_ptr, h_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, tiles_ptr,
    ready_ptr, done_ptr,
    tile_stride, num_rank_blocks, split_k, k_split, split_stride, num_shrink,
    num_col_blocks, blocks_1, blocks_2, blocks_3, col_0, col_1, col_2, col_3, col_4,
    num_slices, in_features, max_rank, flat_rank, out_features, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, S_BLOCK_N: tl.constexpr, S_BLOCK_K: tl.constexpr,
    E_BLOCK_N: tl.constexpr, E_BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    if pid < num_shrink:
        rank_block = pid % num_rank_blocks
        rest = pid // num_rank_blocks
        split = rest % split_k
        tile = rest // split_k
        slot = tl.load(tiles_ptr + tile)
        if slot >= 0:
            offs_n = rank_block * S_BLOCK_N + tl.arange(0, S_BLOCK_N)
            in_flat = offs_n < flat_rank
            slice_of_n = offs_n // max_rank
            rank_of_n = tl.load(ranks_ptr + slot * num_slices + slice_of_n, mask=in_flat, other=0)
            n_valid = in_flat & (offs_n - slice_of_n * max_rank < tl.minimum(rank_of_n, max_rank))
            if tl.max(n_valid.to(tl.int32), axis=0) > 0:
                row_start = tl.load(tiles_ptr + tile_stride + tile)
                num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
                tokens = tl.load(sorted_ptr + row_start
                                 + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
                offs_k = tl.arange(0, S_BLOCK_K)
                k_begin = tl.multiple_of(split * k_split, S_BLOCK_K)
                x_ptrs = x_ptr + tokens[:, None] * stride_xm + (k_begin + offs_k)[None, :]
                a_ptrs = (a_ptr + slot.to(tl.int64) * flat_rank * in_features
                          + offs_n[None, :].to(tl.int64) * in_features
                          + (k_begin + offs_k)[:, None])
                acc = tl.zeros((BLOCK_M, S_BLOCK_N), dtype=tl.float32)
                for k in range(0, k_split, S_BLOCK_K):
                    if EVEN_K:
                        x_tile = tl.load(x_ptrs)
                        a_tile = tl.load(a_ptrs, mask=n_valid[None, :], other=0.0)
                    else:
                        k_ok = k_begin + k + offs_k < in_features
                        x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                        a_tile = tl.load(a_ptrs, mask=n_valid[None, :] & k_ok[:, None],
                                         other=0.0)
                    if UPCAST:
                        x_tile = x_tile.to(tl.float32)
                        a_tile = a_tile.to(tl.float32)
                    acc = tl.dot(x_tile, a_tile, acc, input_precision=PRECISION)
                    x_ptrs += S_BLOCK_K
                    a_ptrs += S_BLOCK_K
                h_ptrs = (h_ptr + split * split_stride
                          + (row_start + offs_m)[:, None].to(tl.int64) * flat_rank
                          + offs_n[None, :])
                tl.store(h_ptrs, acc,
                         mask=(offs_m < num_rows)[:, None] & (offs_n < flat_rank)[None, :])
            tl.debug_barrier()
            tl.atomic_add(ready_ptr + tile, 1, sem="release")
    else:
        pid_e = pid - num_shrink
        col_block = pid_e % num_col_blocks
        tile = pid_e // num_col_blocks
        slot = tl.load(tiles_ptr + tile)
        if slot >= 0:
            expected = split_k * num_rank_blocks
            seen = tl.atomic_add(ready_ptr + tile, 0, sem="acquire")
            while seen < expected:
                seen = tl.atomic_add(ready_ptr + tile, 0, sem="acquire")
            tl.debug_barrier()
            group = ((col_block >= blocks_1).to(tl.int32) + (col_block >= blocks_2).to(tl.int32)
                     + (col_block >= blocks_3).to(tl.int32))
            rank = tl.minimum(tl.load(ranks_ptr + slot * num_slices + group), max_rank)
            if rank > 0:
                scale = tl.load(scales_ptr + slot * num_slices + group)
                first_block = _pick(group, 0, blocks_1, blocks_2, blocks_3)
                col_begin = _pick(group, col_0, col_1, col_2, col_3)
                col_end = _pick(group, col_1, col_2, col_3, col_4)
                offs_n = (col_begin + (col_block - first_block) * E_BLOCK_N
                          + tl.arange(0, E_BLOCK_N))
                n_ok = offs_n < col_end
                row_start = tl.load(tiles_ptr + tile_stride + tile)
                num_rows = tl.load(tiles_ptr + 2 * tile_stride + tile)
                m_ok = offs_m < num_rows
                h_rows = (h_ptr + (row_start + offs_m)[:, None].to(tl.int64) * flat_rank
                          + group * max_rank)
                b_cols = (b_ptr + slot.to(tl.int64) * out_features * max_rank
                          + offs_n[None, :].to(tl.int64) * max_rank)
                acc = tl.zeros((BLOCK_M, E_BLOCK_N), dtype=tl.float32)
                for k in range(0, rank, E_BLOCK_K):
                    offs_k = k + tl.arange(0, E_BLOCK_K)
                    h_tile = tl.zeros((BLOCK_M, E_BLOCK_K), dtype=tl.float32)
                    for split in range(0, split_k):
                        h_tile += tl.load(h_rows + split * split_stride + offs_k[None, :],
                                          mask=m_ok[:, None] & (offs_k < rank)[None, :],
                                          other=0.0, cache_modifier=".cg")
                    b_tile = tl.load(b_cols + offs_k[:, None],
                                     mask=(offs_k < (rank + 7) // 8 * 8)[:, None]
                                     & n_ok[None, :], other=0.0)
                    h_tile = (h_tile * scale).to(b_tile.dtype)
                    if UPCAST:
                        h_tile = h_tile.to(tl.float32)
                        b_tile = b_tile.to(tl.float32)
                    acc = tl.dot(h_tile, b_tile, acc, input_precision=PRECISION)
                tokens = tl.load(sorted_ptr + row_start
                                 + tl.minimum(offs_m, num_rows - 1)).to(tl.int64)
                y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
                out_mask = m_ok[:, None] & n_ok[None, :]
                y_tile = tl.load(y_ptrs, mask=out_mask, other=0.0)
                tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=out_mask)
            tl.debug_barrier()
            finished = tl.atomic_add(done_ptr + tile, 1, sem="acq_rel")
            if finished == num_col_blocks - 1:  # the tile's last expand program: reset both
                tl.atomic_xchg(ready_ptr + tile, 0)
                tl.atomic_xchg(done_ptr + tile, 0)


def launch_one(x: torch.Tensor, y: torch.Tensor, weights: Any, segments: LoRASegments,
               cfg: TileConfig, counters: torch.Tensor) -> None:
    """``y += LoRA(x)`` in one launch with ``cfg``'s shrink and expand tiles."""
    s, e = cfg.shrink, cfg.expand
    assert s.block_m == e.block_m, "one tile list: the shrink and expand block_m must match"
    num_tokens, in_features = x.shape
    flat_rank = len(weights.slice_widths) * weights.max_rank
    split_k, even_k = shrink_split(in_features, s)
    per_split = -(-in_features // split_k)
    k_split = -(-per_split // s.block_k) * s.block_k
    h = torch.empty(split_k, num_tokens, flat_rank, dtype=torch.float32, device=x.device)
    num_rank_blocks = -(-flat_rank // s.block_n)
    bound = segments.tile_bound(s.block_m)
    groups = slice_groups(weights.slice_widths, e.block_n)
    assert len(groups) == 1, "one launch group (≤ 4 slices)"
    _, num_col_blocks, starts, cols = groups[0]
    num_shrink = bound * split_k * num_rank_blocks
    ready, done = counters[0], counters[1]
    _lora_one_launch[(num_shrink + bound * num_col_blocks,)](
        x, weights.lora_a, h, weights.lora_b, y, weights.ranks, weights.scales,
        segments.sorted_tokens, segments.tile_list(s.block_m), ready, done,
        segments.tile_capacity, num_rank_blocks, split_k, k_split, num_tokens * flat_rank,
        num_shrink, num_col_blocks, *starts, *cols, len(weights.slice_widths), in_features,
        weights.max_rank, flat_rank, sum(weights.slice_widths), x.stride(0), y.stride(0),
        BLOCK_M=s.block_m, S_BLOCK_N=s.block_n, S_BLOCK_K=s.block_k, E_BLOCK_N=e.block_n,
        E_BLOCK_K=e.block_k, EVEN_K=even_k, **dot_flags(x.dtype),
        num_warps=max(s.num_warps, e.num_warps), num_stages=min(s.num_stages, e.num_stages))


def launch_pair(x: torch.Tensor, y: torch.Tensor, weights: Any, segments: LoRASegments,
                cfg: TileConfig) -> None:
    launch_expand(launch_shrink(x, weights, segments, cfg.shrink), y, weights, segments,
                  cfg.expand, 1.0)


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    problem = decode_problem(scenario, layer, layers, device, tokens, dtype, "ab", "column")
    weights, x, y, copies = problem.weights, problem.x, problem.y, problem.copies
    token_slots, used, num_slots = problem.token_slots, problem.used, problem.num_slots
    graph_seg = prepare_lora_batch(token_slots, num_slots, "triton").backend_data
    known_seg = prepare_lora_batch(token_slots, num_slots, "triton",
                                   active_slots=used).backend_data
    assert isinstance(graph_seg, LoRASegments) and isinstance(known_seg, LoRASegments)
    counters = torch.zeros(2, graph_seg.tile_capacity, dtype=torch.int32, device=device)
    row: dict[str, Any] = {"scenario": scenario, "layer": layer, "tokens": tokens,
                           "copies": copies, "floor_us": problem.nbytes / rate * 1e6, "us": {},
                           "errors": {}, "configs": {}}
    for name, seg in (("graph", graph_seg), ("known", known_seg)):
        cfg, _ = choose_tile_config(x, weights[0], seg,
                                    None if name == "graph" else active_slice_ranks(weights[0], seg))
        row["configs"][name] = cfg.to_json()
        shipped = y.clone()
        launch_pair(x, shipped, weights[0], seg, cfg)
        variants = [("pair", lambda i, out, c=cfg, s=seg: launch_pair(x, out, weights[i], s, c))]
        if cfg.shrink.block_m == cfg.expand.block_m:
            variants.append(("one", lambda i, out, c=cfg, s=seg: launch_one(
                x, out, weights[i], s, c, counters)))
        else:
            row["errors"][f"one {name}"] = "block_m differs between the shrink and expand tiles"
        for label, launch in variants:
            key = f"{label} {name}"
            if not output_ok(row["errors"], key, lambda out, f=launch: f(0, out), y, shipped, 2e-2,
                             "the shipped pair"):
                continue
            work = y.clone()
            timing = time_calls([lambda i=i, f=launch, w=work: f(i, w) for i in range(copies)],
                                device, repeats=10)
            row["us"][key] = timing.median_us
            output_ok(row["errors"], key, lambda out, f=launch: f(0, out), y, shipped, 2e-2,
                      "the shipped pair after the timed replays")
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    return {label: (label, us) for label, us in row["us"].items()}


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "floor_us")
