"""What the decode-step kernel experiments share (``expand_layout.py``, ``expand_gemv.py``,
``shrink_gemv.py``, ``one_launch_lora.py``, ``pdl_lora.py``, ``dense_pool.py``,
``fused_gemm_lora.py``, ``gemm_shrink.py``; ``decode_gemm.py`` takes only ``setup``): the problem
at the model benchmark's decode step (``decode_tiles.py``'s scenarios, widths and slot ranks;
weights rotated over enough copies to leave L2), the shipped LoRA op as a graph replay runs it
(``graph_lora``), the timing of a variant, and the command line that runs an experiment over every
scenario × layer, writes one JSONL row a point and prints, per point and per decode step (32
layers), the best time of each column the experiment names."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from decode_tiles import L2_BYTES, LAYERS, NUM_SLOTS, SCENARIOS, SLOT_RANKS, TINY_LAYERS, TOKENS

from valora.layers.lora_overlap import lora_side_stream
from valora.ops.lora import LoRASlotWeights, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_segments import LoRASegments
from valora.ops.skinny_gemm import SkinnyTile, select_skinny_tile, skinny_linear, skinny_tile
from valora.ops.tile_config import TileConfig
from valora.ops.tile_table import select_tile_config
from valora.ops.timing import copy_rates, time_calls
from valora.ops.triton_lora import launch_expand, launch_shrink

LAYERS_PER_STEP = 32


@dataclass
class DecodeProblem:
    """One scenario × layer: ``copies`` slot-weight copies (the same ranks, other values), the
    tokens' slots, inputs ``x`` and outputs ``y``, and the bytes of the adapter parts read."""

    slots: list[int]
    ranks: list[int]
    """Every slot's rank (``SLOT_RANKS`` cycled), all slices."""
    used: list[int]
    weights: list[LoRASlotWeights]
    token_slots: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    nbytes: int

    @property
    def copies(self) -> int:
        return len(self.weights)

    @property
    def num_slots(self) -> int:
        return NUM_SLOTS


def decode_problem(scenario: str, layer: str, layers: dict, device: torch.device, tokens: int,
                   dtype: torch.dtype, parts: str, b_layout: str | None = None) -> DecodeProblem:
    """The problem of ``scenario`` at ``layer``; ``parts`` (``"a"``, ``"b"`` or ``"ab"``) names the
    adapter matrices whose bytes count (the floor, and how many copies leave L2). ``lora_b`` is
    stored in ``b_layout`` (default: the engine's, ``valora.ops.lora.lora_b_layout``); an
    experiment whose own kernels read the raw storage as ``[S, out, R]`` asks for ``"column"``."""
    in_features, widths = layers[layer]
    slots = SCENARIOS[scenario][:tokens]
    ranks = [SLOT_RANKS[s % 4] for s in range(NUM_SLOTS)]
    used = sorted(set(slots))
    per_rank = (in_features * len(widths) if "a" in parts else 0) + (
        sum(widths) if "b" in parts else 0)
    nbytes = 2 * sum(ranks[s] * per_rank for s in used)
    copies = max(1, min(8, -(-L2_BYTES // max(nbytes, 1))))
    weights = [make_slot_weights(ranks, in_features, widths, dtype, device, seed=i,
                                 b_layout=b_layout) for i in range(copies)]
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    y = torch.randn(tokens, sum(widths), device=device, dtype=dtype)
    token_slots = torch.tensor(slots, dtype=torch.int32, device=device)
    return DecodeProblem(slots, ranks, used, weights, token_slots, x, y, nbytes)


@dataclass
class GraphLoRA:
    """The shipped LoRA op on a problem as a decode-graph replay runs it: the step's segments
    without host hints and the table's mix entry for them (``"mix"``; the heuristic's on the CPU)."""

    segments: LoRASegments
    tiles: TileConfig
    source: str

    def apply(self, x: torch.Tensor, weights: LoRASlotWeights, out: torch.Tensor) -> None:
        """``out += LoRA(x)``: the ATMM shrink, then the expand."""
        h = launch_shrink(x, weights, self.segments, self.tiles.shrink)
        launch_expand(h, out, weights, self.segments, self.tiles.expand, 1.0)


def graph_lora(problem: DecodeProblem, in_features: int, widths: tuple[int, ...]) -> GraphLoRA:
    """``GraphLoRA`` of ``problem`` at a layer of these widths (storage rank: the slots')."""
    x = problem.x
    segments = prepare_lora_batch(problem.token_slots, problem.num_slots, "triton").backend_data
    assert isinstance(segments, LoRASegments)
    storage = problem.weights[0].max_rank
    tiles, source = select_tile_config(x.device, x.shape[0], storage, in_features, widths,
                                       min(x.shape[0], problem.num_slots), storage_rank=storage,
                                       mix=x.device.type == "cuda")
    return GraphLoRA(segments, tiles, source)


def base_weights(in_features: int, out_features: int, device: torch.device,
                 dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of a random base weight ``[out, in]``, enough (≤ 4) to leave L2 between calls."""
    copies = max(1, min(4, -(-(100 << 20) // (2 * in_features * out_features))))
    return [torch.randn(out_features, in_features, device=device, dtype=dtype)
            / in_features ** 0.5 for _ in range(copies)]


@dataclass
class GemmPoint:
    """A scenario × layer with the base GEMM the LoRA op rides on (the experiments that fold
    LoRA into the GEMM: ``dense_pool.py``, ``fused_gemm_lora.py``, ``gemm_shrink.py``): the
    problem, the shipped op as graphs run it, copies of the base weight (``base_weights``) and
    the rounds that rotate both past L2."""

    problem: DecodeProblem
    lora: GraphLoRA
    in_features: int
    widths: tuple[int, ...]
    base: list[torch.Tensor]

    @property
    def out_features(self) -> int:
        return sum(self.widths)

    @property
    def rounds(self) -> int:
        return max(self.problem.copies, len(self.base))

    def row(self, scenario: str, layer: str, tokens: int, rate: float) -> dict[str, Any]:
        """The fields every such experiment's JSONL row starts with (floors at ``rate``)."""
        return {"scenario": scenario, "layer": layer, "tokens": tokens,
                "table_source": self.lora.source, "table": self.lora.tiles.to_json(),
                "copies": self.problem.copies, "gemm_copies": len(self.base),
                "lora_floor_us": self.problem.nbytes / rate * 1e6,
                "gemm_floor_us": 2 * self.in_features * self.out_features / rate * 1e6,
                "us": {}, "errors": {}}

    def check_and_time(self, row: dict[str, Any], tile: SkinnyTile,
                       variants: list[tuple[str, Callable[[torch.Tensor, int], None]]],
                       dtype: torch.dtype, device: torch.device,
                       checked: Callable[[str], bool] = lambda label: label != "skinny"
                       ) -> dict[str, Any]:
        """Record the base GEMM's tile in ``row``, take the ``skinny+atmm`` variant's output as
        the reference, then check and time every variant (module ``check_and_time``)."""
        row["skinny_tile"] = [tile.block_m, tile.block_n, tile.block_k, tile.num_warps,
                              tile.num_stages]
        want = torch.empty_like(self.problem.y)
        dict(variants)["skinny+atmm"](want, 0)
        check_and_time(row, variants, self.problem.y, want, tolerance_of(dtype),
                       "skinny + ATMM", self.rounds, device, checked)
        return row


def slice_ends(widths: tuple[int, ...]) -> list[int]:
    """The first three slice ends of a fused layer, padded past any column: the in-GEMM
    experiments' kernels find a column's slice by comparing it with them (≤ 4 slices)."""
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    return (ends + [1 << 30] * 3)[:3]


def gemm_tiles(point: GemmPoint, device: torch.device, tokens: int,
               element_size: int) -> tuple[SkinnyTile, SkinnyTile]:
    """The skinny GEMM's tile for the point's base GEMM (the GPU table's, else the heuristic's)
    and the same with ``block_n`` dividing every slice width (a column block in one slice: the
    experiments that finish the LoRA inside the GEMM's program)."""
    tile = (select_skinny_tile(device, tokens, point.out_features, point.in_features,
                               element_size) if device.type == "cuda" else None)
    tile = tile or skinny_tile(tokens, point.out_features, point.in_features, element_size)
    assert tile is not None
    block_n = math.gcd(tile.block_n, *point.widths)
    return tile, SkinnyTile(tile.block_m, block_n, tile.block_k, tile.num_warps,
                            tile.num_stages)


def gemm_baselines(point: GemmPoint, tile: SkinnyTile, device: torch.device
                   ) -> list[tuple[str, Callable[[torch.Tensor, int], None]]]:
    """``(label, launch(out, i))`` of what an in-GEMM LoRA variant is measured against:
    ``skinny`` (the base GEMM alone), ``skinny+atmm`` (serial: the GEMM, then the shipped ATMM
    op with the graph's tiles — the reference output) and, on CUDA, ``overlap`` (the engine's
    decode path: the ATMM op into a zeroed ``δ`` on the side stream beside the GEMM, then the
    add)."""
    problem, lora, base = point.problem, point.lora, point.base
    x, weights = problem.x, problem.weights

    def skinny(out: torch.Tensor, i: int) -> None:
        out.copy_(skinny_linear(x, base[i % len(base)], None, tile))

    def serial(out: torch.Tensor, i: int) -> None:
        skinny(out, i)
        lora.apply(x, weights[i % problem.copies], out)

    def overlap(out: torch.Tensor, i: int) -> None:
        main = torch.cuda.current_stream(device)
        side = lora_side_stream(device)
        delta = torch.empty_like(out)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            delta.zero_()
            lora.apply(x, weights[i % problem.copies], delta)
        yy = skinny_linear(x, base[i % len(base)], None, tile)
        main.wait_stream(side)
        out.copy_(yy.add_(delta))

    variants: list[tuple[str, Callable[[torch.Tensor, int], None]]] = [
        ("skinny", skinny), ("skinny+atmm", serial)]
    if device.type == "cuda":
        variants.append(("overlap", overlap))
    return variants


def gemm_point(scenario: str, layer: str, layers: dict, device: torch.device, tokens: int,
               dtype: torch.dtype) -> GemmPoint:
    """``GemmPoint`` of ``scenario`` at ``layer`` (adapter bytes: ``A`` and ``B``)."""
    problem = decode_problem(scenario, layer, layers, device, tokens, dtype, "ab")
    in_features, widths = layers[layer]
    return GemmPoint(problem, graph_lora(problem, in_features, widths), in_features,
                     tuple(widths), base_weights(in_features, sum(widths), device, dtype))


def tolerance_of(dtype: torch.dtype) -> float:
    """The largest difference (relative to max |want|) a variant may show against the shipped
    path: bf16 rounding, else fp32's."""
    return 2e-2 if dtype == torch.bfloat16 else 1e-4


def output_ok(errors: dict[str, str], key: str, launch: Callable[[torch.Tensor], object],
              start: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> bool:
    """Run ``launch`` once on a copy of ``start`` and compare the result with ``want`` (max abs
    difference ≤ ``tolerance`` × max(1, max |want|)); an exception (a config the GPU cannot run
    is a result) or a difference goes to ``errors[key]`` and gives False."""
    out = start.clone()
    try:
        launch(out)
    except Exception as error:
        errors[key] = f"{type(error).__name__}: {error}"[:300]
        return False
    diff = (out.float() - want.float()).abs().max().item()
    if diff > tolerance * max(1.0, want.float().abs().max().item()):
        errors[key] = f"differs from {what} by {diff:.3g}"
        return False
    return True


def time_variant(row: dict[str, Any], label: str, launch: Callable[[torch.Tensor, int], object],
                 start: torch.Tensor, rounds: int, device: torch.device) -> None:
    """``row["us"][label]``: the median µs of ``launch(out, i)`` over ``i`` in ``range(rounds)``
    (rotating weight copies) on one copy of ``start``, replayed from CUDA graphs; an exception
    goes to ``row["errors"][label]`` instead."""
    work = start.clone()
    try:
        timing = time_calls([lambda i=i: launch(work, i) for i in range(rounds)], device,
                            repeats=10)
    except Exception as error:
        row["errors"][label] = f"timing: {type(error).__name__}: {error}"[:300]
        return
    row["us"][label] = timing.median_us


def check_and_time(row: dict[str, Any], variants: list[tuple[str, Any]], start: torch.Tensor,
                   want: torch.Tensor, tolerance: float, what: str, rounds: int,
                   device: torch.device, checked: Callable[[str], bool]) -> None:
    """Every ``(label, launch)`` of ``variants`` through ``time_variant``, those whose label
    ``checked`` accepts after ``output_ok`` against ``want`` (called ``what``): a variant that
    fails it is not timed."""
    for label, launch in variants:
        if checked(label) and not output_ok(row["errors"], label, lambda out, f=launch: f(out, 0),
                                            start, want, tolerance, what):
            continue
        time_variant(row, label, launch, start, rounds, device)


RunPoint = Callable[[str, str, dict, torch.device, float, int, torch.dtype], dict[str, Any]]
Columns = Callable[[dict[str, Any]], dict[str, tuple[str, float]]]


def best_of(times: dict[str, float], prefix: str = "") -> tuple[str, float]:
    """The fastest ``(label, µs)`` among labels starting with ``prefix`` (``("-", 0)``: none)."""
    mine = {k: v for k, v in times.items() if k.startswith(prefix)}
    if not mine:
        return "-", 0.0
    label = min(mine, key=mine.__getitem__)
    return label, mine[label]


def best_columns(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, tuple[str, float]]:
    """Per column name, the fastest ``(label, µs)`` of the labels that are the name or start
    with it and a space (a variant's tile choices); names without a label are left out."""
    picked: dict[str, tuple[str, float]] = {}
    for column in names:
        mine = {k: v for k, v in row["us"].items() if k == column or k.startswith(column + " ")}
        if mine:
            best = min(mine, key=mine.__getitem__)
            picked[column] = (best, mine[best])
    return picked


@dataclass
class Setup:
    """An experiment's command line and machine: ``args.out`` / ``args.sha`` / ``args.tiny``, the
    device and dtype (``--tiny``: the CPU interpreter, fp32; else CUDA, bf16), the best measured
    copy rate (bytes/s, the floors' divisor) and the device's name."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    rate: float
    name: str


def setup(doc: str) -> Setup:
    """Parse ``--out`` / ``--sha`` / ``--tiny``, measure the copy rate, print it with the device."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--tiny", action="store_true", help="small shapes, CPU interpreter")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rate = max(copy_rates(device, 1 << 20 if args.tiny else 1 << 30).values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}: best copy {rate / 1e12:.2f} TB/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return Setup(args, device, dtype, rate, name)


def run_main(doc: str, run_point: RunPoint, columns: Columns, floor_key: str) -> None:
    """``setup``, then every scenario × layer through ``run_point``; prints ``columns(row)`` and
    the floor a point, then their sums over a decode step."""
    run = setup(doc)
    args, device, dtype, rate, name = run.args, run.device, run.dtype, run.rate, run.name
    layers = TINY_LAYERS if args.tiny else LAYERS
    tokens = 4 if args.tiny else TOKENS
    totals: dict[str, dict[str, float]] = {}
    with args.out.open("w") as sink:
        for scenario in SCENARIOS:
            for layer in layers:
                row = run_point(scenario, layer, layers, device, rate, tokens, dtype)
                row.update(device=name, git_sha=args.sha)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                total = totals.setdefault(scenario, {"floor": 0.0})
                total["floor"] += row[floor_key]
                parts = []
                for column, (label, us) in columns(row).items():
                    parts.append(f"{column} {us:6.1f} ({label})")
                    total[column] = total.get(column, 0.0) + us
                print(f"{scenario:<16} {layer:<7} " + " | ".join(parts)
                      + f" | floor {row[floor_key]:5.1f} | errors {len(row['errors'])}"
                      + "".join(f"\n    {k}: {v}" for k, v in row["errors"].items()),
                      flush=True)
    print(f"per decode step ({LAYERS_PER_STEP} layers), best per column, ms: " + "; ".join(
        f"{s}: " + ", ".join(f"{k} {LAYERS_PER_STEP * v / 1e3:.3f}" for k, v in t.items())
        for s, t in totals.items()))
