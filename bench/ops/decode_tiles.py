"""The LoRA op's tiles at the decode step of the model benchmark: which shrink / expand tiles the
step takes, and what every candidate tile (the tuner's and a few new ones) costs there.

The decode benchmark (``bench/model/bench_decode.py``, 32 sequences) spends ≈ 1.2 ms in shrinks
and ≈ 2.2 ms in expands per step with 32 distinct adapters of ranks 8–64 (storage rank 64),
against ≈ 0.51 + 0.61 ms of adapter bytes (``bench/results/model/h200-fused-kv-4af5ff6/``). Its
graphs take the table's worst-case bucket (storage rank, one adapter per token; ``graph``
below), an eager step with its slots known on the host the bucket of their own ranks and count
(``known``). This times, per scenario × layer at LLaVA-1.5-7B widths, the shrink and the expand
alone under both and under every candidate — ``tile_candidates``' tiles with ``block_m`` ≤ 32
and splits 4–32 for the shrink, its ``block_m`` = 16 tiles for the expand, plus 1- and 2-stage,
2-warp and wider-column variants not in the tuner's lists (``NEW_*``) — each checked against the
shipped output first. Adapter weights rotate over enough copies to leave L2 (the step's 32 layers
do not fit in it either). GPU times are CUDA-graph replays (``valora.ops.timing``).

    python bench/ops/decode_tiles.py --out $OUT/decode_tiles.jsonl [--sha SHA] [--tiny]

Prints per scenario the step's projected LoRA time (32 layers × the four ops) under the graph's
tiles, the known tiles and the best candidate per op, beside the adapter-byte floor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_candidates import EXPAND_TILES, SHRINK_TILES
from valora.ops.tile_config import ExpandConfig, ShrinkConfig
from valora.ops.timing import copy_rates, time_calls
from valora.ops.triton_lora import (
    active_slice_ranks,
    choose_tile_config,
    launch_expand,
    launch_shrink,
    live_flat_rank,
)

LAYERS = {"o": (4096, (4096,)), "qkv": (4096, (4096,) * 3), "gate_up": (4096, (11008,) * 2),
          "down": (11008, (4096,))}
TINY_LAYERS = {"o": (64, (64,)), "qkv": (64, (64, 16, 16))}
SLOT_RANKS = (8, 16, 32, 64)  # the model benchmark's slots: rank SLOT_RANKS[s % 4], 32 slots
NUM_SLOTS, TOKENS, LAYERS_PER_STEP = 32, 32, 32
SCENARIOS = {"mixed32_ranks": [i % 32 for i in range(TOKENS)],
             "mixed8_r16": [1 + 4 * (i % 8) for i in range(TOKENS)],
             "one_adapter_r16": [1] * TOKENS}
NEW_SHRINK = ((16, 16, 256, 2, 2), (16, 32, 256, 2, 2), (16, 16, 128, 2, 2), (16, 32, 128, 4, 2),
              (16, 64, 64, 4, 2), (16, 16, 512, 4, 2), (16, 32, 512, 4, 2), (16, 64, 128, 8, 2))
NEW_EXPAND = ((16, 64, 16, 2, 1), (16, 128, 16, 2, 1), (16, 128, 16, 4, 1), (16, 256, 16, 4, 1),
              (16, 256, 16, 8, 1), (16, 512, 16, 4, 1), (16, 512, 16, 8, 1), (16, 128, 32, 4, 1),
              (16, 256, 32, 4, 1), (16, 64, 16, 2, 2), (16, 128, 16, 2, 2), (16, 64, 32, 2, 1),
              (16, 512, 32, 8, 1), (16, 1024, 16, 8, 1),
              # session 11: the whole storage rank in one chunk (one B load, no rank loop), the
              # tail masked at the rank rounded up to 8 (``lora_launch_args.expand_b_mask``)
              (16, 64, 64, 2, 1), (16, 128, 64, 2, 1), (16, 128, 64, 4, 1), (16, 256, 64, 4, 1),
              (16, 256, 64, 8, 1), (16, 512, 64, 8, 1), (16, 128, 32, 2, 1))
EARLY_Y_EXPAND = ((16, 128, 16, 4, 1), (16, 256, 16, 4, 1), (16, 128, 32, 4, 1),
                  (16, 256, 32, 4, 1), (16, 64, 64, 2, 1), (16, 128, 64, 2, 1),
                  (16, 128, 64, 4, 1), (16, 256, 64, 4, 1), (16, 256, 64, 8, 1))
"""Tiles also timed with the ``y`` load issued before the rank loop (label suffix ``ey``)."""
SPLITS = (4, 8, 16, 32)
L2_BYTES = 150 << 20  # rotate weights over more than this (H200 L2: 50 MiB)


def shrink_configs() -> list[tuple[str, ShrinkConfig]]:
    tiles = [t for t in SHRINK_TILES if t[0] <= 32] + list(NEW_SHRINK)
    return [(f"{m}x{n}x{k} k{s} w{w} s{st}" + (" new" if (m, n, k, w, st) in NEW_SHRINK else ""),
             ShrinkConfig(m, n, k, s, w, st)) for m, n, k, w, st in tiles for s in SPLITS]


def expand_configs() -> list[tuple[str, ExpandConfig]]:
    tiles = [t for t in EXPAND_TILES if t[0] == 16] + list(NEW_EXPAND)
    found = [(f"{m}x{n}x{k} w{w} s{st}" + (" new" if (m, n, k, w, st) in NEW_EXPAND else ""),
              ExpandConfig(m, n, k, w, st)) for m, n, k, w, st in tiles]
    found += [(f"{m}x{n}x{k} w{w} s{st} ey", ExpandConfig(m, n, k, w, st, early_y=True))
              for m, n, k, w, st in EARLY_Y_EXPAND]
    return found


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, expand_only: bool = False) -> dict[str, Any]:
    in_features, widths = layers[layer]
    slots = SCENARIOS[scenario][:tokens]
    ranks = [SLOT_RANKS[s % 4] for s in range(NUM_SLOTS)]
    used = sorted(set(slots))
    a_bytes = 2 * sum(ranks[s] * in_features * len(widths) for s in used)
    b_bytes = 2 * sum(ranks[s] * sum(widths) for s in used)
    copies = max(1, min(8, -(-L2_BYTES // (a_bytes + b_bytes))))
    weights = [make_slot_weights(ranks, in_features, widths, torch.bfloat16, device, seed=i)
               for i in range(copies)]
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    y = torch.randn(tokens, sum(widths), device=device, dtype=torch.bfloat16)
    token_slots = torch.tensor(slots, dtype=torch.int32, device=device)
    graph_batch = prepare_lora_batch(token_slots, NUM_SLOTS, "triton")
    known_batch = prepare_lora_batch(token_slots, NUM_SLOTS, "triton", active_slots=used)
    graph_seg, known_seg = graph_batch.backend_data, known_batch.backend_data
    assert isinstance(graph_seg, LoRASegments) and isinstance(known_seg, LoRASegments)
    graph_cfg, _ = choose_tile_config(x, weights[0], graph_seg, None)
    known_cfg, source = choose_tile_config(x, weights[0], known_seg,
                                           active_slice_ranks(weights[0], known_seg))
    live = live_flat_rank(tuple([max(ranks[s] for s in used)] * len(widths)), weights[0].max_rank)
    reference_h = launch_shrink(x, weights[0], known_seg, known_cfg.shrink).sum(0)
    # h's entries the expand reads: position p (slot-sorted order) × slice j × rank < its slot's
    storage = weights[0].max_rank
    sorted_slots = token_slots[known_seg.sorted_tokens.long()].long()
    slot_rank = torch.tensor(ranks, device=device)[sorted_slots]
    flat = torch.arange(len(widths) * storage, device=device)
    valid = (flat % storage)[None, :] < slot_rank[:, None]
    shipped = y.clone()
    launch_expand(launch_shrink(x, weights[0], known_seg, known_cfg.shrink), shipped, weights[0],
                  known_seg, known_cfg.expand, 1.0)
    row: dict[str, Any] = {"scenario": scenario, "layer": layer, "tokens": tokens,
                           "copies": copies, "known_source": source,
                           "graph": graph_cfg.to_json(), "known": known_cfg.to_json(),
                           "shrink_floor_us": a_bytes / rate * 1e6,
                           "expand_floor_us": b_bytes / rate * 1e6,
                           "shrink_us": {}, "expand_us": {}, "errors": {}}

    def shrink_time(label: str, cfg: ShrinkConfig, seg: LoRASegments, live_rank: int | None
                    ) -> None:
        try:
            h = launch_shrink(x, weights[0], seg, cfg, live_rank)
        except Exception as error:  # a config the GPU cannot run is a result
            row["errors"][label] = f"{type(error).__name__}: {error}"[:200]
            return
        got = h.sum(0)
        if not torch.allclose(got[valid], reference_h[valid], rtol=2e-2, atol=2e-2):
            row["errors"][label] = "differs from the shipped shrink"
            return
        timing = time_calls([lambda w=w: launch_shrink(x, w, seg, cfg, live_rank)
                             for w in weights], device, repeats=10)
        row["shrink_us"][label] = timing.median_us

    def expand_time(label: str, cfg: ExpandConfig, seg: LoRASegments,
                    shrink_cfg: ShrinkConfig) -> None:
        h = launch_shrink(x, weights[0], seg, shrink_cfg)
        out = y.clone()
        try:
            launch_expand(h, out, weights[0], seg, cfg, 1.0)
        except Exception as error:
            row["errors"][label] = f"{type(error).__name__}: {error}"[:200]
            return
        diff = (out.float() - shipped.float()).abs().max().item()
        if diff > 2e-2 * max(1.0, shipped.float().abs().max().item()):
            row["errors"][label] = f"differs from the shipped expand by {diff:.3g}"
            return
        hs = [launch_shrink(x, w, seg, shrink_cfg) for w in weights]
        work = y.clone()
        timing = time_calls([lambda w=w, h=h: launch_expand(h, work, w, seg, cfg, 1.0)
                             for w, h in zip(weights, hs, strict=True)], device, repeats=10)
        row["expand_us"][label] = timing.median_us

    shrink_time("graph", graph_cfg.shrink, graph_seg, None)
    shrink_time("known", known_cfg.shrink, known_seg, live)
    for label, cfg in () if expand_only else shrink_configs():
        shrink_time(label, cfg, known_seg, live)
    expand_time("graph", graph_cfg.expand, graph_seg, graph_cfg.shrink)
    expand_time("known", known_cfg.expand, known_seg, known_cfg.shrink)
    for label, cfg in expand_configs():
        # on the graph's shrink output: its split-K planes are what a graph's expand reads
        expand_time(label, cfg, known_seg, graph_cfg.shrink)
    return row


def summarise(rows: list[dict[str, Any]]) -> None:
    print("scenario         layer   | shrink µs graph known best (tile)              | "
          "expand µs graph known best (tile)               | floors A B")
    for row in rows:
        s, e = row["shrink_us"], row["expand_us"]
        bs = min(s, key=s.get) if s else "-"
        be = min(e, key=e.get) if e else "-"
        print(f"{row['scenario']:<16} {row['layer']:<7} | {s.get('graph', 0):6.1f} "
              f"{s.get('known', 0):6.1f} {s.get(bs, 0):6.1f} ({bs:<26}) | "
              f"{e.get('graph', 0):6.1f} {e.get('known', 0):6.1f} {e.get(be, 0):6.1f} "
              f"({be:<26}) | {row['shrink_floor_us']:5.1f} {row['expand_floor_us']:5.1f}")
    print(f"per decode step ({LAYERS_PER_STEP} layers × the four ops), ms:")
    for scenario in SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        if not mine:
            continue
        def total(kind: str, pick: str, rows: list[dict[str, Any]] = mine) -> float:
            values = [r[kind].get(pick) if pick != "best" else min(r[kind].values(), default=0)
                      for r in rows]
            return LAYERS_PER_STEP * sum(v or 0.0 for v in values) / 1e3
        floor = LAYERS_PER_STEP * sum(r["shrink_floor_us"] + r["expand_floor_us"]
                                      for r in mine) / 1e3
        print(f"  {scenario:<16} graph {total('shrink_us', 'graph') + total('expand_us', 'graph'):.3f}"
              f" known {total('shrink_us', 'known') + total('expand_us', 'known'):.3f}"
              f" best {total('shrink_us', 'best') + total('expand_us', 'best'):.3f}"
              f" (shrink {total('shrink_us', 'best'):.3f}, expand {total('expand_us', 'best'):.3f})"
              f" floor {floor:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--tiny", action="store_true", help="small shapes, CPU interpreter")
    parser.add_argument("--expand-only", action="store_true",
                        help="time only the graph / known shrinks, every expand candidate")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    layers = TINY_LAYERS if args.tiny else LAYERS
    tokens = 4 if args.tiny else TOKENS
    rates = copy_rates(device, 1 << 20 if args.tiny else 1 << 30)
    rate = max(rates.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in rates.items()))
    start = time.perf_counter()
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as sink:
        for scenario in SCENARIOS:
            for layer in layers:
                if time.perf_counter() - start > args.budget:
                    print("budget spent; points left out")
                    break
                row = run_point(scenario, layer, layers, device, rate, tokens, args.expand_only)
                row.update(device=name, git_sha=args.sha, ceilings=rates)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                rows.append(row)
                print(f"{scenario} {layer}: {len(row['errors'])} errors, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    summarise(rows)


if __name__ == "__main__":
    main()
