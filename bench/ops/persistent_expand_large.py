"""The persistent, software-pipelined expand at prefill sizes: does looping a program over
(tile, column block) items let the pipeliner hide the large-``T`` expand's read-modify-write of
``y``?

The grid's floor-bar misses at large ``T`` are expands with rank 64 or mixed ranks: 2–2.7× their
bytes floor where rank 16 runs at 1.3–1.4× (``grid-retuned-prefill2-h200-db8c40d``), and cuBLAS's
dense ``y.addmm_(h, Bᵀ)`` on the same traffic is ≈ 1.8× it (session 9, ``NOTES.md``). Each
shipped expand program loads ``h`` and ``B``, runs its dot, then loads, adds and stores its ``y``
tile: one pass, nothing to overlap inside a program, latency hidden only by other resident
programs — fewer of them as the rank (and the tiles' shared memory) grows. Session 16's
persistent expand (``persistent_expand.py``) walks items ``pid, pid + grid, …`` in a
``tl.range(..., num_stages=S)`` loop, so the next item's ``h`` / ``B`` / ``y`` loads can issue
while the current one computes; at decode sizes it lost (too few items a program to amortise its
prologue). Predicted here: with thousands of items a program sees 10–100 of them, and the rank-64
expands move toward the rank-16 ones' 1.3–1.4× their floor.

(Its kernel is the shipped one since session 17: ``valora.ops.lora_expand_persistent``, chosen
by the tuner for large buckets; the measurement below ran this script's own copy, identical but
for the scale multiplier and the one-plane ``SPLIT_K``.)

Per point (LLaVA-1.5-7B widths, bf16, rank-major ``B``, tokens spread over the adapters as in the
grid): the shipped shrink gives ``h`` (the table's tiles and split-K), the shipped expand
(``shipped``, the table's tiles) gives the reference, then each persistent variant (tile ×
programs an SM × stages) is checked against it and timed under CUDA graphs.

    python bench/ops/persistent_expand_large.py --out $OUT/persistent_large.jsonl [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from persistent_expand import launch_persistent

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.tile_config import ExpandConfig
from valora.ops.timing import copy_rates, time_calls
from valora.ops.triton_lora import (
    active_slice_ranks,
    choose_tile_config,
    launch_expand,
    launch_shrink,
    live_flat_rank,
)

LAYERS = {"q": (4096, (4096,)), "qkv": (4096, (4096, 4096, 4096)),
          "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}
RANKS = {"uniform16": [16] * 8, "uniform64": [64] * 8, "mixed": [32, 64, 128, 8, 16, 32, 64, 128]}
TILES = ((64, 128, 32, 4), (64, 128, 64, 4), (128, 128, 32, 8), (128, 256, 32, 8),
         (64, 256, 32, 8))
PROGRAMS_PER_SM = (1, 2, 4)
STAGES = (2, 3)


def expand_bytes(tokens: int, widths: tuple[int, ...], ranks: list[int], split_k: int,
                 max_rank: int) -> int:
    """What the expand must move: its fp32 ``h`` planes, the adapters' ``B``, ``y`` read and
    written (bf16)."""
    flat = len(widths) * max_rank
    return 4 * split_k * tokens * flat + 2 * sum(ranks) * sum(widths) + 4 * tokens * sum(widths)


def run_point(tokens: int, layer: str, kind: str, device: torch.device, rate: float,
              tiny: bool) -> dict:
    in_features, widths = (64, (64, 32)) if tiny else LAYERS[layer]
    ranks = [min(r, 64) for r in RANKS[kind]] if not tiny else [16, 8, 4, 16]
    weights = make_slot_weights(ranks, in_features, widths, torch.bfloat16, device, seed=3,
                                b_layout="rank")
    slots = make_token_slots(tokens, len(ranks), "uniform", torch.Generator().manual_seed(5))
    batch = prepare_lora_batch(slots.to(device), len(ranks), "triton",
                               active_slots=sorted({int(s) for s in slots.tolist() if s >= 0}))
    segments = batch.backend_data
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    y = torch.randn(tokens, sum(widths), device=device, dtype=torch.bfloat16)
    slice_ranks = active_slice_ranks(weights, segments)
    config, source = choose_tile_config(x, weights, segments, slice_ranks)
    live = live_flat_rank(slice_ranks, weights.max_rank) if slice_ranks is not None else None
    h = launch_shrink(x, weights, segments, config.shrink, live)
    want = y.clone()
    launch_expand(h, want, weights, segments, config.expand, 1.0)
    want_delta = (want.float() - y.float())
    nbytes = expand_bytes(tokens, widths, ranks, h.shape[0], weights.max_rank)
    row: dict = {"tokens": tokens, "layer": layer, "ranks": kind, "adapters": len(ranks),
                 "table_source": source, "expand": config.expand.__dict__,
                 "split_k": int(h.shape[0]), "floor_us": nbytes / rate * 1e6, "us": {},
                 "errors": {}}
    variants = [("shipped", lambda out: launch_expand(h, out, weights, segments, config.expand,
                                                      1.0))]
    grid = ([(TILES[0], 1, 2)] if tiny else
            [(t, p, s) for t in TILES for p in PROGRAMS_PER_SM for s in STAGES])
    for (m, n, k, w), per_sm, stages in grid:
        cfg = ExpandConfig(m if not tiny else 16, n if not tiny else 32, k if not tiny else 16,
                           w, stages, persistent=per_sm)
        variants.append((f"persistent {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{w} "
                         f"p{per_sm} s{stages}",
                         lambda out, c=cfg: launch_persistent(h, out, weights, segments, c)))
    for label, launch in variants:
        out = y.clone()
        try:
            launch(out)
        except Exception as exc:  # a tile the device cannot hold: recorded, not timed
            row["errors"][label] = f"{type(exc).__name__}: {str(exc)[:160]}"
            continue
        delta = out.float() - y.float()
        err = float((delta - want_delta).norm() / want_delta.norm().clamp_min(1e-12))
        if not math.isfinite(err) or err > 2e-2:
            row["errors"][label] = f"wrong: rel err {err:.3g}"
            continue
        row["us"][label] = (time_calls([lambda o=out, f=launch: f(o)], device, repeats=10,
                                       budget_us=20e3).median_us if device.type == "cuda"
                            else 0.0)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--tiny", action="store_true", help="a small shape (CPU interpreter)")
    parser.add_argument("--budget-s", type=float, default=150.0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate = max(copy_rates(device, 1 << 30).values()) if device.type == "cuda" else 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    points = ([(40, "q", "mixed")] if args.tiny else
              [(t, layer, kind) for kind in ("mixed", "uniform64", "uniform16")
               for t in (16384, 4096) for layer in ("qkv", "gate_up", "down", "q")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = []
    with args.out.open("w") as sink:
        for tokens, layer, kind in points:
            if time.monotonic() - started > args.budget_s:
                print(f"budget: stopped before T={tokens} {layer} {kind}")
                break
            row = {"device": name, "git_sha": args.sha,
                   **run_point(tokens, layer, kind, device, rate, args.tiny)}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            rows.append(row)
    print(f"{name}; copy rate {rate / 1e12:.2f} TB/s; expand µs (× its floor)")
    for row in rows:
        us = row["us"]
        shipped = us.get("shipped", float("nan"))
        best = min((k for k in us if k != "shipped"), key=us.__getitem__, default=None)
        floor = row["floor_us"]
        line = (f"T={row['tokens']:5d} {row['layer']:7s} {row['ranks']:9s} floor {floor:7.1f} | "
                f"shipped {shipped:7.1f} ({shipped / floor:.2f}x)")
        if best is not None:
            line += f" | {best} {us[best]:7.1f} ({us[best] / floor:.2f}x)"
        print(line + f" | errors {len(row['errors'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
