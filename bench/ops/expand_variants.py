"""The LoRA expand's tile choices at the floor-bar shapes, one GPU run: where its time goes.

At large T the expand streams ``y`` (read + write) and moved ≈ 1.8 TB/s on an H200 (``bench/ops/
NOTES.md``); at decode it is one dependent chain of loads. This times, per point, the expand
alone under the table's configuration and a fixed list of alternatives — each with the ``y`` tile
loaded late (after the rank loop, as shipped) and early (``ExpandConfig.early_y``) — after checking
each against the shipped output; the whole op (shrink + expand) with the table's configuration,
late and early; for one-adapter points cuBLAS's ``y.addmm_(h, Bᵀ)`` (the dense ideal of the same
read-modify-write); and the copy ceilings in the same run (``valora.ops.timing.copy_rates``;
the first run of this script, ``bench/results/ops/expand-variants-h200-ef1051a/``, had three
that were all too low).
Floors: the op's bytes (x, y read + written, the used adapters'
weights) over the best ceiling. GPU times are CUDA-graph replays (``valora.ops.timing``).

    python bench/ops/expand_variants.py --out $OUT/expand_variants.jsonl [--sha SHA]
        [--budget SECONDS] [--tiny]   # --tiny: small shapes, CPU interpreter, no claims
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import ExpandConfig
from valora.ops.timing import copy_rates, time_calls
from valora.ops.triton_lora import (
    choose_tile_config,
    launch_expand,
    launch_shrink,
    lora_apply_triton,
)

LAYERS = {"q": (4096, (4096,)), "qkv": (4096, (4096,) * 3), "gate_up": (4096, (11008,) * 2),
          "down": (11008, (4096,))}
MIXED = (8, 16, 32, 64, 128)
# (tokens, adapters, popularity, ranks): the large-T floor misses and the decode step's bucket.
POINTS = ([(t, 8, "uniform", r) for t in (16384, 4096, 1024)
           for r in ("uniform64", "mixed", "uniform16")]
          + [(t, 1, "uniform", "uniform64") for t in (16384, 4096)]
          + [(32, 32, "distinct", "mixed"), (32, 32, "distinct", "uniform16")])
# (block_m, block_n, block_k, num_warps, num_stages), tried late and early.
ALTERNATIVES = ((64, 128, 32, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3),
                (64, 256, 32, 8, 3), (128, 64, 32, 4, 3), (32, 128, 32, 4, 2),
                (128, 256, 32, 8, 2), (64, 128, 64, 8, 3))
DECODE_ALTERNATIVES = ((16, 256, 16, 4, 2), (16, 128, 16, 4, 2), (16, 128, 32, 4, 2),
                       (16, 256, 32, 8, 2))
TINY_LAYERS = {"q": (64, (64,)), "qkv": (64, (64, 16, 16))}


def op_bytes(x: torch.Tensor, y: torch.Tensor, slots: list[int], ranks: list[int],
             in_features: int, widths: tuple[int, ...]) -> int:
    rows = sum(1 for s in slots if s >= 0)
    used = {s for s in slots if s >= 0}
    weights = sum(ranks[s] * (in_features + w) for s in used for w in widths)
    return 2 * (rows * (in_features + 2 * sum(widths)) + weights)


def run_point(point: tuple[int, int, str, str], layer: str, layers: dict, device: torch.device,
              best_rate: float) -> dict:
    tokens, adapters, popularity, rank_kind = point
    in_features, widths = layers[layer]
    ranks = ([MIXED[(s + 2) % len(MIXED)] for s in range(adapters)] if rank_kind == "mixed"
             else [int(rank_kind.removeprefix("uniform"))] * adapters)
    generator = torch.Generator().manual_seed(tokens + adapters)
    slots = make_token_slots(tokens, adapters, popularity, generator)
    weights = make_slot_weights(ranks, in_features, widths, torch.bfloat16, device, 3)
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16)
    y = torch.randn(tokens, sum(widths), device=device, dtype=torch.bfloat16)
    batch = prepare_lora_batch(slots.to(device), adapters, "triton")
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments)
    table, source = choose_tile_config(x, weights, segments, None)
    h = launch_shrink(x, weights, segments, table.shrink)
    shipped = y.clone()
    launch_expand(h, shipped, weights, segments, table.expand, 1.0)
    alternatives = ALTERNATIVES if tokens >= 256 else DECODE_ALTERNATIVES
    configs = [("table", table.expand)] + [(f"{m}x{n}x{k} w{w} s{s}", ExpandConfig(m, n, k, w, s))
                                           for m, n, k, w, s in alternatives]
    nbytes = op_bytes(x, y, slots.tolist(), ranks, in_features, widths)
    row: dict = {"tokens": tokens, "adapters": adapters, "popularity": popularity,
                 "ranks": rank_kind, "layer": layer, "table_source": source,
                 "table": table.to_json(), "bytes": nbytes,
                 "floor_us": nbytes / best_rate * 1e6,
                 "expand_floor_us": 2 * 2 * tokens * sum(widths) / best_rate * 1e6,
                 "expand_us": {}, "op_us": {}, "errors": {}}
    for name, base in configs:
        for early in (False, True):
            cfg = replace(base, early_y=early)
            label = f"{name} {'early' if early else 'late'}"
            out = y.clone()
            try:
                launch_expand(h, out, weights, segments, cfg, 1.0)
            except Exception as error:  # a config the GPU cannot run is a result
                row["errors"][label] = f"{type(error).__name__}: {error}"[:200]
                continue
            diff = (out.float() - shipped.float()).abs().max().item()
            if diff > 1e-2 * shipped.float().abs().max().item():
                row["errors"][label] = f"differs from the shipped expand by {diff:.3g}"
                continue
            work = y.clone()
            timing = time_calls([lambda w=work, c=cfg: launch_expand(h, w, weights, segments, c,
                                                                     1.0)], device, repeats=10)
            row["expand_us"][label] = timing.median_us
    for early in (False, True):
        cfg = replace(table, expand=replace(table.expand, early_y=early))
        work = y.clone()
        timing = time_calls([lambda w=work, c=cfg: lora_apply_triton(w, x, weights, batch, config=c)],
                            device, repeats=10)
        row["op_us"]["early" if early else "late"] = timing.median_us
    if adapters == 1:  # the dense ideal of the same read-modify-write, every slice at once
        b = weights.lora_b[0, :, :ranks[0]]
        h1 = torch.randn(tokens, ranks[0], device=device, dtype=torch.bfloat16)
        work = y.clone()
        timing = time_calls([lambda: work.addmm_(h1, b.t())], device, repeats=10)
        row["cublas_addmm_us"] = timing.median_us
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--budget", type=float, default=240.0)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    layers = TINY_LAYERS if args.tiny else LAYERS
    points = [(40, 3, "uniform", "mixed")] if args.tiny else POINTS
    rates = copy_rates(device, 1 << 20 if args.tiny else 1 << 30)
    best = max(rates.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in rates.items()))
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as sink:
        for point in points:
            for layer in layers:
                if time.perf_counter() - start > args.budget:
                    print("budget spent; points left out")
                    return
                row = run_point(point, layer, layers, device, best)
                row.update(device=name, git_sha=args.sha, ceilings=rates)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                report(row)


def report(row: dict) -> None:
    exp = row["expand_us"]
    if not exp:
        print(row["tokens"], row["layer"], "no expand timed", row["errors"])
        return
    best = min(exp, key=exp.get)
    late, early = exp.get("table late"), exp.get("table early")
    op = row["op_us"]
    print(f"T={row['tokens']:>5} a{row['adapters']:<2} {row['ranks']:<9} {row['layer']:<7} "
          f"expand table {late:8.1f} early {early or float('nan'):8.1f} best {exp[best]:8.1f} "
          f"({best}) floor {row['expand_floor_us']:7.1f} | op {op['late']:8.1f} -> {op['early']:8.1f}"
          f" floor {row['floor_us']:7.1f} ({op['late'] / row['floor_us']:.2f}x -> "
          f"{op['early'] / row['floor_us']:.2f}x)"
          + (f" | cuBLAS addmm {row['cublas_addmm_us']:.1f}" if "cublas_addmm_us" in row else ""))


if __name__ == "__main__":
    main()
