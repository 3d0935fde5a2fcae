"""Decode-size LoRA kernel variants side by side on the GPU (≤ ~90 s on an H200).

For every point (T ∈ {1, 16, 64, 256}; layers q, qkv, gate_up, down; ranks uniform16, uniform64,
mixed; 32 distinct / 8 uniform adapters; T = 1 keeps 32 distinct) each method is checked against
the fp32 twin (relative error ≤ 1e-2, else "wrong"), then timed as CUDA-graph replays over
rotating input sets (``valora.ops.timing.time_calls``), like ``bench_lora_ops.py``:

- ``current``: the shipped two-launch path (table entry or heuristic), as the benchmark ran it;
- ``split<=4``: the same tiles with the shrink's split-K capped at 4 (the expand sums fewer
  fp32 partial planes);
- ``fused``: the single-launch kernel with ``heuristic_fused_config`` (what
  ``FUSED_MAX_TOKENS`` would switch on);
- ``fused*``: the best of the fused kernel over ``col_blocks`` ∈ {1, 2, 4, 8, 16} (column
  blocks per program), with the winning ``col_blocks`` named;
- ``vllm``: vLLM 0.33's kernels (pointer cache refreshed, see ``lora_methods.py``); ``base``:
  the layer's GEMM.

Also: the prepare step's cost (``LoRASegments.update``, once per forward step) and a check that
the earlier benchmark's vLLM "wrong" entries came from vLLM's data_ptr-keyed pointer cache.
Writes ``$OUT/variants.jsonl``; prints a short table last.

    PYTHONPATH=$PWD python3 bench/ops/variants_gpu.py --out $OUT [--budget 70]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_ops
from bench_lora_ops import LAYERS, TINY_LAYERS, make_sets, reference
from lora_methods import InputSet, build_base_gemm, build_vllm, vllm_ops

from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import TileConfig, heuristic_fused_config
from valora.ops.tile_table import select_tile_config
from valora.ops.timing import time_calls
from valora.ops.triton_lora import lora_apply_triton

DEVICE = torch.device("cuda")
TOKENS = (1, 16, 64, 256)
COL_BLOCKS = (1, 2, 4, 8, 16)
RANK_KINDS = ("uniform16", "uniform64", "mixed")
COMBOS = ((32, "distinct"), (8, "uniform"))


def points() -> list[dict[str, object]]:
    """The decode-bar points (q, gate_up; uniform16; 32 distinct) first, then the rest."""
    first = [dict(tokens=t, adapters=32, popularity="distinct", ranks="uniform16", layer=layer)
             for layer in ("q", "gate_up") if layer in LAYERS for t in TOKENS]
    rest = [dict(tokens=t, adapters=a, popularity=p, ranks=r, layer=layer)
            for t in TOKENS for layer in LAYERS for r in RANK_KINDS
            for a, p in (COMBOS[:1] if t == 1 else COMBOS)]
    return first + [p for p in rest if p not in first]


def table_config(s: InputSet) -> TileConfig:
    w = s.weights
    return select_tile_config(DEVICE, s.x.shape[0], w.max_rank, s.x.shape[1], w.slice_widths,
                              len(s.active))[0]


def valora_call(s: InputSet, pick):  # pick: InputSet -> TileConfig
    batch = prepare_lora_batch(s.slots, s.weights.num_slots, "triton",
                               num_active_slots=len(s.active))
    config = pick(s)
    return lambda: lora_apply_triton(s.y, s.x, s.weights, batch, 1.0, config)


def fused_pick(col_blocks: int):
    def pick(s: InputSet) -> TileConfig:
        base = table_config(s)
        w = s.weights
        fused = heuristic_fused_config(s.x.shape[0], w.max_rank, s.x.shape[1], w.slice_widths,
                                       len(s.active), col_blocks=col_blocks)
        return TileConfig(base.shrink, base.expand, fused)
    return pick


def fused_call(s: InputSet, col_blocks: int):
    return valora_call(s, fused_pick(col_blocks))


def capped_pick(s: InputSet) -> TileConfig:
    base = table_config(s)
    return TileConfig(replace(base.shrink, split_k=min(base.shrink.split_k, 4)), base.expand)


def measure(build, sets: list[InputSet], ref: torch.Tensor) -> dict[str, object]:
    for s in sets:
        s.y.copy_(s.y_initial)
    try:
        calls = [build(s) for s in sets]
        calls[0]()
    except Exception as error:  # a variant failing must not stop the run
        return {"status": f"error: {type(error).__name__}: {str(error)[:120]}"}
    err = float((sets[0].y.float() - ref).norm() / ref.norm())
    if not math.isfinite(err) or err > 1e-2:
        return {"status": "wrong", "rel_err": err}
    t = time_calls(calls, DEVICE, repeats=10)
    return {"status": "ok", "rel_err": err, "median_us": t.median_us, "min_us": t.min_us}


def base_gemm_us(point: dict) -> float:
    in_features, widths = LAYERS[str(point["layer"])]
    x = torch.randn(int(point["tokens"]), in_features, device=DEVICE).bfloat16()  # type: ignore[call-overload]
    calls = [build_base_gemm(x, torch.randn(sum(widths), in_features, device=DEVICE).bfloat16())[0]
             for _ in range(2)]
    return time_calls(calls, DEVICE, repeats=10).median_us


def prepare_cost() -> dict[int, float]:
    """µs per ``LoRASegments.update`` (the once-per-step prepare), 32 slots, under graphs."""
    out = {}
    for tokens in TOKENS:
        segments = LoRASegments.allocate(tokens, 32, DEVICE, 32)
        slots = torch.randint(0, 32, (tokens,), device=DEVICE, dtype=torch.int32)
        out[tokens] = time_calls([partial(segments.update, slots, 32)], DEVICE,
                                 repeats=10).median_us
    return out


def vllm_cache_check() -> str:
    """Reproduce the earlier "wrong" vLLM entries: a rank-16 / 128-slot qkv problem, freed, then
    a rank-64 / 32-slot one (the same bytes per slice), first without refreshing vLLM's pointer
    cache (reporting whether the new tensors' addresses hit an old entry), then with it."""
    import lora_methods
    from vllm.lora.ops.triton_ops import utils as vllm_utils
    saved = lora_methods.refresh_vllm_pointer_cache
    notes = []
    for refresh in (False, True):
        vllm_utils._LORA_A_PTR_DICT.clear()
        vllm_utils._LORA_B_PTR_DICT.clear()
        torch.cuda.empty_cache()
        hits: list[bool] = []

        def record(a_list, b_list, device, hits=hits, refresh=refresh) -> None:
            hits.append(tuple(t.data_ptr() for t in a_list) in vllm_utils._LORA_A_PTR_DICT)
            if refresh:
                saved(a_list, b_list, device)

        lora_methods.refresh_vllm_pointer_cache = record
        try:
            for ranks, adapters, popularity in (("uniform16", 128, "zipf"),
                                                ("uniform64", 32, "distinct")):
                point = dict(tokens=16, adapters=adapters, popularity=popularity, ranks=ranks,
                             layer="qkv")
                sets = make_sets(point, seed=7)
                result = measure(build_vllm, sets, reference(sets[0]))
                notes.append(f"{'refresh' if refresh else 'no refresh'} {ranks}/{adapters}: "
                             f"{result['status']} (err {result.get('rel_err', float('nan')):.1e},"
                             f" stale key hit {any(hits)})")
                hits.clear()
                del sets, result
        finally:
            lora_methods.refresh_vllm_pointer_cache = saved
    return "; ".join(notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=70.0, help="seconds for the points")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU interpreter, tiny layers, no vLLM: exercises the script only")
    args = parser.parse_args()
    global DEVICE, TOKENS
    if args.smoke:
        DEVICE = bench_lora_ops.DEVICE = torch.device("cpu")
        LAYERS.clear()
        LAYERS.update(TINY_LAYERS)
        TOKENS = (1, 16)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    have_vllm = not args.smoke and vllm_ops() is not None
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (smoke)"
    print(f"{name}; vLLM kernels: {have_vllm}", flush=True)
    methods = {"current": lambda s: valora_call(s, table_config),
               "split<=4": lambda s: valora_call(s, capped_pick),
               "fused": lambda s: valora_call(s, fused_pick(0))}
    for cb in COL_BLOCKS:
        methods[f"fused_cb{cb}"] = partial(fused_call, col_blocks=cb)
    if have_vllm:
        methods["vllm"] = build_vllm
    rows = []
    base_cache: dict[tuple, float] = {}
    todo = points()
    with (args.out / "variants.jsonl").open("w") as sink:
        for index, point in enumerate(todo):
            if time.monotonic() - began > args.budget:
                print(f"budget spent after {index} of {len(todo)} points", flush=True)
                break
            sets = make_sets(point, seed=1000 + index)
            ref = reference(sets[0])
            row = {"setup": point, "config": table_config(sets[0]).to_json(), "methods": {}}
            for name, build in methods.items():
                row["methods"][name] = measure(build, sets, ref)
            key = (point["tokens"], point["layer"])
            if key not in base_cache:
                base_cache[key] = base_gemm_us(point)
            row["methods"]["base"] = {"status": "ok", "median_us": base_cache[key]}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            rows.append(row)
            del sets, ref
    prep = prepare_cost()
    cache_note = vllm_cache_check() if have_vllm else "vLLM kernels absent"
    summary = {"prepare_us": prep, "vllm_cache_check": cache_note,
               "seconds": time.monotonic() - began}
    (args.out / "variants_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(rows, prep, cache_note)
    return 0


def _us(row: dict, name: str) -> float | None:
    m = row["methods"].get(name, {})
    return m.get("median_us") if m.get("status") == "ok" else None


def _cell(row: dict, name: str) -> str:
    v = _us(row, name)
    return f"{v:7.1f}" if v is not None else f"{row['methods'].get(name, {}).get('status', '-')[:7]:>7}"


def print_table(rows: list[dict], prep: dict[int, float], cache_note: str) -> None:
    print("prepare (once per step, 32 slots): " + ", ".join(f"T={t}: {v:.1f} µs"
                                                             for t, v in prep.items()))
    print(f"vLLM pointer-cache check: {cache_note}")
    print(f"{'T':>4} {'layer':>7} {'ranks':>9} {'a':>12} | {'current':>7} {'split<=4':>8} "
          f"{'fused':>7} {'fused*':>7} {'cb':>3} {'vllm':>7} {'base':>7}")
    ratios: dict[tuple[str, int], list[float]] = {}
    chosen: dict[int, int] = {}
    for row in rows:
        p = row["setup"]
        fused = {cb: _us(row, f"fused_cb{cb}") for cb in COL_BLOCKS}
        ok = {cb: v for cb, v in fused.items() if v is not None}
        best = min(ok, key=ok.__getitem__) if ok else None
        if best:
            chosen[best] = chosen.get(best, 0) + 1
        cur, vllm = _us(row, "current"), _us(row, "vllm")
        for name, new in (("fused", _us(row, "fused")), ("fused*", ok.get(best) if best else None),
                          ("split<=4", _us(row, "split<=4"))):
            if cur and new:
                ratios.setdefault((name, int(p["tokens"])), []).append(cur / new)
            if vllm and new and name != "split<=4":
                ratios.setdefault((f"{name} vs vLLM", int(p["tokens"])), []).append(vllm / new)
        if cur and vllm:
            ratios.setdefault(("current vs vLLM", int(p["tokens"])), []).append(vllm / cur)
        print(f"{p['tokens']:>4} {p['layer']:>7} {p['ranks']:>9} {p['adapters']:>3}×"
              f"{p['popularity']:>8} | {_cell(row, 'current')} {_cell(row, 'split<=4'):>8} "
              f"{_cell(row, 'fused')} "
              f"{(f'{ok[best]:7.1f}' if best else '      -')} {best or '-':>3} "
              f"{_cell(row, 'vllm')} {_cell(row, 'base')}")
    print("geomean speed-ups (current/variant, or vLLM/variant), by T:")
    for name in ("split<=4", "fused", "fused*", "current vs vLLM", "fused vs vLLM",
                 "fused* vs vLLM"):
        cells = []
        for tokens in TOKENS:
            values = ratios.get((name, tokens), [])
            if values:
                g = math.exp(sum(math.log(v) for v in values) / len(values))
                cells.append(f"T={tokens}: {g:.2f}× ({min(values):.2f}–{max(values):.2f})")
        print(f"  {name:>15}: " + "; ".join(cells))
    print(f"best col_blocks counts: {dict(sorted(chosen.items()))}; points: {len(rows)}")


if __name__ == "__main__":
    raise SystemExit(main())
