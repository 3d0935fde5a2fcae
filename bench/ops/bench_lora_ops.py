"""The LoRA-operator grid on the GPU: valora's Triton kernels next to their peers, one run.

Per ``shared/BENCHMARKS.md``: tokens × adapters/popularity × ranks × layers (bf16); for every grid
point and every method, the output is checked against the fp32 twin first, then timed as CUDA
graph replays over rotating input sets (median, min, max per call). Floors come from the copy
bandwidth and bf16 matmul rate measured in the same run. One JSONL row per point.

    python bench/ops/bench_lora_ops.py --out $OUT/lora_ops.jsonl [--grid core|full]
        [--time-budget SECONDS] [--sha GIT_SHA]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_methods import (
    BUILDERS,
    InputSet,
    build_base_gemm,
    gathered_bytes,
    vllm_ops,
)

from valora.ops.lora import LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.timing import Timing, copy_rates, rotations_for, time_calls

LAYERS = {"q": (4096, (4096,)), "qkv": (4096, (4096,) * 3), "gate_up": (4096, (11008,) * 2),
          "down": (11008, (4096,))}
TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
RANK_KINDS = ("uniform16", "uniform64", "mixed")
MIXED = (8, 16, 32, 64, 128)
CORE_COMBOS = ((32, "distinct"), (128, "zipf"), (8, "uniform"), (32, "one_hot"))
FULL_COMBOS = tuple((n, p) for n in (1, 8, 32, 128) for p in ("distinct", "uniform", "zipf",
                                                                 "one_hot"))
GATHER_LIMIT = 6 << 30
TINY_LAYERS = {"q": (64, (64,)), "qkv": (64, (64, 16, 16))}
TINY_TOKENS = (40,)
DEVICE = torch.device("cuda")


def slot_ranks(kind: str, num_adapters: int) -> list[int]:
    if kind == "mixed":
        return [MIXED[(s + 2) % len(MIXED)] for s in range(num_adapters)]
    return [int(kind.removeprefix("uniform"))] * num_adapters


def grid(kind: str) -> list[dict[str, object]]:
    """Decode-bar points first, then the grid (T=1 keeps one combo: one token, one adapter).

    ``tiny``: a few small shapes to exercise the script itself (CPU interpreter), no claims."""
    combos = CORE_COMBOS if kind in ("core", "tiny") else FULL_COMBOS
    points = [dict(tokens=t, adapters=32, popularity="distinct", ranks="uniform16", layer=layer)
              for layer in ("q", "gate_up") for t in (64, 256)] if kind != "tiny" else []
    for tokens in TOKENS if kind != "tiny" else TINY_TOKENS:
        for layer in LAYERS:
            for ranks in RANK_KINDS:
                for adapters, popularity in (combos[:1] if tokens == 1 else combos):
                    point = dict(tokens=tokens, adapters=adapters, popularity=popularity,
                                 ranks=ranks, layer=layer)
                    if point not in points:
                        points.append(point)
    return points


def measure_ceilings(copy_bytes: int, matmul_size: int) -> dict[str, float]:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, on random data.

    The copy rate is the fastest of ``valora.ops.timing.copy_rates``'s three ways; each way's
    rate is kept in the row. Until 2026-11-29 the grid took the graph-replayed ``copy_`` alone,
    a memcpy node at 2.7 TB/s on an H200 where a kernel moves 4.3: its floors were ≈ 1.6× too
    lenient."""
    rates = copy_rates(DEVICE, copy_bytes)
    n = matmul_size
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    mm = time_calls([lambda: a @ b], DEVICE, repeats=10, min_calls_per_graph=4)
    return {"copy_bytes_per_s": max(rates.values()), **rates,
            "bf16_flops_per_s": 2 * n**3 / (mm.median_us * 1e-6)}


def make_sets(point: dict, seed: int) -> list[InputSet]:
    in_features, widths = LAYERS[str(point["layer"])]
    tokens, adapters = int(point["tokens"]), int(point["adapters"])  # type: ignore[call-overload]
    ranks = slot_ranks(str(point["ranks"]), adapters)
    first = make_token_slots(tokens, adapters, str(point["popularity"]),
                             torch.Generator().manual_seed(seed))
    used = {int(s) for s in first.tolist() if s >= 0}
    per_rank = in_features * len(widths) + sum(widths)
    touched = 2 * (tokens * (in_features + 2 * sum(widths)) + sum(ranks[a] for a in used) * per_rank)
    storage = 2 * adapters * max(ranks) * per_rank
    sets = []
    for i in range(rotations_for(touched, set_bytes=storage, limit=16)):
        generator = torch.Generator().manual_seed(seed + i)
        slots = make_token_slots(tokens, adapters, str(point["popularity"]), generator)
        weights = make_slot_weights(ranks, in_features, widths, torch.bfloat16, DEVICE, seed + i)
        x = torch.randn(tokens, in_features, device=DEVICE, dtype=torch.bfloat16)
        y = torch.randn(tokens, sum(widths), device=DEVICE, dtype=torch.bfloat16)
        sets.append(InputSet(x, y, weights, slots.to(DEVICE), slots.tolist(), y.clone()))
    return sets


def reference(s: InputSet) -> torch.Tensor:
    w = s.weights
    fp32 = LoRASlotWeights(w.lora_a.float(), w.lora_b.float(), w.ranks, w.scales, w.slice_widths,
                           w.ranks_cpu)
    out = s.y.float()
    lora_apply(out, s.x.float(), fp32, prepare_lora_batch(s.slots, w.num_slots, "reference"))
    return out


def floors(s: InputSet, ceilings: dict[str, float]) -> dict[str, float]:
    """Bytes that must move and flops that must run for the LoRA term, as times."""
    in_features, widths = s.x.shape[1], s.weights.slice_widths
    rows = [v for v in s.slots_cpu if v >= 0]
    ranks = s.weights.ranks_cpu
    weight_elems = sum(r * (in_features + w) for a in set(rows) for r, w in zip(ranks[a], widths,
                                                                                 strict=True))
    nbytes = 2 * (len(rows) * (in_features + 2 * sum(widths)) + weight_elems)
    flops = 2 * sum(r * (in_features + w) for a in rows for r, w in zip(ranks[a], widths,
                                                                        strict=True))
    bytes_us = nbytes / ceilings["copy_bytes_per_s"] * 1e6
    flops_us = flops / ceilings["bf16_flops_per_s"] * 1e6
    return {"bytes": nbytes, "flops": flops, "floor_bytes_us": bytes_us,
            "floor_flops_us": flops_us, "floor_us": max(bytes_us, flops_us)}


def timed(calls: list) -> Timing:
    return time_calls(calls, DEVICE, repeats=20 if DEVICE.type == "cuda" else 1, budget_us=25e3)


def run_method(name: str, sets: list[InputSet], ref: torch.Tensor) -> dict[str, object]:
    if name == "gathered_bmm" and gathered_bytes(sets[0]) > GATHER_LIMIT:
        return {"status": "skipped: gathered weights exceed memory limit"}
    for s in sets:  # earlier methods' timing replays accumulated into y
        s.y.copy_(s.y_initial)
    calls = [BUILDERS[name](s) for s in sets]
    calls[0]()
    err = float((sets[0].y.float() - ref).norm() / ref.norm())
    if not math.isfinite(err) or err > 1e-2:
        return {"status": "wrong", "rel_err": err}
    t = timed(calls)
    return {"status": "ok", "rel_err": err, "median_us": t.median_us, "min_us": t.min_us,
            "max_us": t.max_us}


def base_gemm(point: dict, cache: dict) -> dict[str, object]:
    key = (point["tokens"], point["layer"])
    if key not in cache:
        in_features, widths = LAYERS[str(point["layer"])]
        tokens = int(point["tokens"])  # type: ignore[call-overload]
        sets = rotations_for(2 * sum(widths) * in_features, limit=16)
        calls = [build_base_gemm(torch.randn(tokens, in_features, device=DEVICE).bfloat16(),
                                 torch.randn(sum(widths), in_features, device=DEVICE).bfloat16())[0]
                 for _ in range(sets)]
        t = timed(calls)
        cache[key] = {"status": "ok", "median_us": t.median_us, "min_us": t.min_us,
                      "max_us": t.max_us}
    return cache[key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", choices=("core", "full", "tiny"), default="core")
    parser.add_argument("--device", default="cuda", help="cpu: smoke test under the interpreter")
    parser.add_argument("--time-budget", type=float, default=0.0)
    parser.add_argument("--sha", default=os.environ.get("VALORA_GIT_SHA", ""))
    parser.add_argument("--tokens", default="",
                        help="comma list: only the grid's points of these token counts")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.grid == "tiny":
        LAYERS.clear()
        LAYERS.update(TINY_LAYERS)
    sha = args.sha or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                     text=True, check=False).stdout.strip()
    methods = [m for m in BUILDERS if m != "vllm" or vllm_ops() is not None]
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    ceilings = measure_ceilings(1 << 30 if DEVICE.type == "cuda" else 1 << 20,
                                8192 if DEVICE.type == "cuda" else 256)
    ways = ", ".join(f"{k.removeprefix('copy_')} {v / 1e12:.2f}" for k, v in ceilings.items()
                     if k.startswith("copy_") and k != "copy_bytes_per_s")
    print(f"{device_name}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s ({ways}), "
          f"bf16 {ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s; methods {methods}", flush=True)
    began, base_cache, rows = time.monotonic(), {}, []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    points = grid(args.grid)
    if args.tokens:
        wanted = {int(t) for t in args.tokens.split(",")}
        points = [p for p in points if p["tokens"] in wanted]
    with args.out.open("w") as sink:
        for index, point in enumerate(points):
            if args.time_budget and time.monotonic() - began > args.time_budget:
                print(f"time budget spent after {index} of {len(points)} points", flush=True)
                break
            sets = make_sets(point, seed=index)
            ref = reference(sets[0])
            row = {"bench": "lora_ops", "device": device_name, "git_sha": sha, "setup": point,
                   "dtype": "bf16", "input_sets": len(sets), "ceilings": ceilings,
                   "active_adapters": len(sets[0].active), "batch_max_rank": sets[0].batch_max_rank,
                   **floors(sets[0], ceilings), "methods": {}}
            for name in methods:
                try:
                    row["methods"][name] = run_method(name, sets, ref)
                except Exception as error:  # a peer failing must not stop the grid
                    row["methods"][name] = {"status": f"error: {type(error).__name__}: {error}"}
            row["methods"]["base_gemm"] = base_gemm(point, base_cache)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            rows.append(row)
            del sets, ref
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    def us(row: dict, name: str) -> str:
        m = row["methods"].get(name, {})
        return f"{m['median_us']:8.1f}" if "median_us" in m else f"{m.get('status', '-')[:8]:>8}"
    print(f"{'T':>6} {'layer':>7} {'ranks':>9} {'pop':>9} {'a':>4} | {'valora':>8} {'vllm':>8} "
          f"{'loop':>8} {'bmm':>8} {'base':>8} {'floor':>7}")
    for row in rows:
        p = row["setup"]
        print(f"{p['tokens']:>6} {p['layer']:>7} {p['ranks']:>9} {p['popularity']:>9} "
              f"{p['adapters']:>4} | {us(row, 'valora')} {us(row, 'vllm')} {us(row, 'peft_loop')} "
              f"{us(row, 'gathered_bmm')} {us(row, 'base_gemm')} {row['floor_us']:7.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
