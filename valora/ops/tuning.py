"""``valora tune-kernels``: profile LoRA tile configurations on this GPU and write its table.

For every shape bucket (tokens × rank × layer × adapters in the batch) the tuner builds a random
problem at the bucket's shape (uniform rank, uniform popularity), times every shrink candidate
under CUDA graphs with rotating inputs, then every expand candidate on the best shrink's output;
the best expand is then timed after the next-best shrinks too (fewer split-K planes make the
expand cheaper), and the pair with the smallest sum wins. Winners are stored under the bucket key in
``valora/ops/tables/<GPU>.json`` (or ``--out``).
The table is written after each bucket; a rerun skips buckets already present (resume) unless
``--no-resume``. ``--time-budget`` stops cleanly between buckets. A progress bar shows the way.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from valora.logger import get_logger
from valora.ops.lora import LoRASlotWeights, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_candidates import expand_candidates, shrink_candidates
from valora.ops.tile_config import TileConfig, shape_bucket
from valora.ops.tile_table import TABLE_DIR, TileTable, table_file_name
from valora.ops.timing import rotations_for, time_calls
from valora.ops.triton_lora import launch_expand, launch_shrink

logger = get_logger(__name__)

LAYERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "q": (4096, (4096,)),
    "qkv": (4096, (4096, 4096, 4096)),
    "gate_up": (4096, (11008, 11008)),
    "down": (11008, (4096,)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class TuneShape:
    num_tokens: int
    max_rank: int
    in_features: int
    slice_widths: tuple[int, ...]
    num_adapters: int


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _layer(spec: str) -> tuple[int, tuple[int, ...]]:
    """A known layer name or ``IN:W1,W2,...``."""
    if spec in LAYERS:
        return LAYERS[spec]
    in_text, widths = spec.split(":")
    return int(in_text), tuple(_ints(widths))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="valora tune-kernels", description=__doc__)
    parser.add_argument("--tokens", type=_ints,
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384])
    parser.add_argument("--ranks", type=_ints, default=[16, 64, 128])
    parser.add_argument("--adapters", type=_ints, default=[1, 8, 32, 128])
    parser.add_argument("--layers", default="q,qkv,gate_up,down",
                        help="comma list of q|qkv|gate_up|down or IN:W1,W2 (separate with ';')")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="table file (default: shipped)")
    parser.add_argument("--no-resume", action="store_true", help="re-tune buckets in the table")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = no limit")
    parser.add_argument("--max-candidates", type=int, default=0, help="per kernel; 0 = all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pair-shrinks", type=int, default=3,
                        help="shrinks (best first) whose output the best expand is timed on")
    return parser.parse_args(argv)


def _shapes(args: argparse.Namespace) -> list[TuneShape]:
    specs = args.layers.split(";") if ";" in args.layers or ":" in args.layers \
        else args.layers.split(",")
    shapes: dict[str, TuneShape] = {}
    for spec in specs:
        in_features, widths = _layer(spec)
        for tokens in args.tokens:
            for rank in args.ranks:
                for adapters in args.adapters:
                    shape = TuneShape(tokens, rank, in_features, widths, min(adapters, tokens))
                    bucket = shape_bucket(tokens, rank, in_features, sum(widths),
                                          shape.num_adapters, len(widths))
                    if bucket is not None:
                        shapes.setdefault(bucket.key, shape)
    return list(shapes.values())


@dataclass(frozen=True)
class InputSet:
    x: torch.Tensor
    y: torch.Tensor
    weights: LoRASlotWeights
    segments: LoRASegments


def _problems(shape: TuneShape, dtype: torch.dtype, device: torch.device,
              seed: int) -> list[InputSet]:
    """Rotating input sets for one bucket: enough that their calls together touch
    ``ROTATE_BYTES`` (operands cold in L2, as in a model step; at most ``MAX_ROTATIONS``).

    A call touches its tokens' activations and the factors of the adapters its tokens use (not
    the whole slot storage): counting the storage instead gave one set for most large buckets,
    whose replays then read adapters left in L2 and favoured configurations that lose when the
    operands come from memory."""
    generator = torch.Generator().manual_seed(seed)
    width = sum(shape.slice_widths)
    item = torch.tensor([], dtype=dtype).element_size()
    slot_sets = [make_token_slots(shape.num_tokens, shape.num_adapters, "uniform", generator)]
    used = len(set(slot_sets[0].tolist()))
    touched = item * (shape.num_tokens * (shape.in_features + 2 * width)
                      + used * shape.max_rank * (shape.in_features * len(shape.slice_widths)
                                                 + width))
    storage = item * shape.num_adapters * shape.max_rank * (
        shape.in_features * len(shape.slice_widths) + width)
    rotations = rotations_for(touched, set_bytes=storage)
    sets: list[InputSet] = []
    for i in range(rotations):
        weights = make_slot_weights([shape.max_rank] * shape.num_adapters, shape.in_features,
                                    shape.slice_widths, dtype, device, seed + i)
        if i >= len(slot_sets):
            slot_sets.append(make_token_slots(shape.num_tokens, shape.num_adapters, "uniform",
                                              generator))
        batch = prepare_lora_batch(slot_sets[i].to(device), shape.num_adapters, "triton",
                                   num_active_slots=shape.num_adapters)
        x = torch.randn(shape.num_tokens, shape.in_features, device=device, dtype=dtype)
        y = torch.randn(shape.num_tokens, width, device=device, dtype=dtype)
        assert isinstance(batch.backend_data, LoRASegments)
        sets.append(InputSet(x, y, weights, batch.backend_data))
    return sets


def tune_bucket(shape: TuneShape, dtype: torch.dtype, device: torch.device, num_sms: int,
                max_candidates: int, repeats: int,
                pair_shrinks: int = 1) -> tuple[TileConfig, dict[str, float]]:
    """Time the candidates for one shape (module docstring): shrink, expand, pairs."""
    sets = _problems(shape, dtype, device, seed=shape.num_tokens * 7919 + shape.max_rank)
    args = (shape.num_tokens, shape.max_rank)
    shrinks = shrink_candidates(*args, shape.in_features, shape.num_adapters,
                                len(shape.slice_widths), num_sms)
    expands = expand_candidates(*args, max(shape.slice_widths), shape.num_adapters,
                                shape.in_features, len(shape.slice_widths), num_sms)
    if max_candidates > 0:
        shrinks, expands = shrinks[:max_candidates], expands[:max_candidates]
    shrink_times = {}
    for cfg in shrinks:
        calls = [partial(launch_shrink, s.x, s.weights, s.segments, cfg) for s in sets]
        shrink_times[cfg] = time_calls(calls, device, repeats=repeats).median_us
    best_shrink = min(shrink_times, key=shrink_times.__getitem__)
    partials = [launch_shrink(s.x, s.weights, s.segments, best_shrink) for s in sets]
    expand_times = {}
    for ecfg in expands:
        expand_calls = [partial(launch_expand, h, s.y, s.weights, s.segments, ecfg, 1.0)
                        for s, h in zip(sets, partials, strict=True)]
        expand_times[ecfg] = time_calls(expand_calls, device, repeats=repeats).median_us
    best_expand = min(expand_times, key=expand_times.__getitem__)
    times = {"shrink": shrink_times[best_shrink], "expand": expand_times[best_expand],
             "shrink_heuristic": shrink_times[shrinks[0]],
             "expand_heuristic": expand_times[expands[0]]}
    pair_total = times["shrink"] + times["expand"]
    for cfg in sorted(shrink_times, key=shrink_times.__getitem__)[1:max(1, pair_shrinks)]:
        outs = [launch_shrink(s.x, s.weights, s.segments, cfg) for s in sets]
        expand_calls = [partial(launch_expand, h, s.y, s.weights, s.segments, best_expand, 1.0)
                        for s, h in zip(sets, outs, strict=True)]
        expand_us = time_calls(expand_calls, device, repeats=repeats).median_us
        if shrink_times[cfg] + expand_us < pair_total:
            best_shrink, pair_total = cfg, shrink_times[cfg] + expand_us
            times.update(shrink=shrink_times[cfg], expand=expand_us)
    return TileConfig(best_shrink, best_expand), times


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.error("tune-kernels needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 4)
    out = args.out or TABLE_DIR / table_file_name(name)
    table = TileTable.load(out, name)
    table.device = name
    pending = []
    for shape in _shapes(args):
        bucket = shape_bucket(shape.num_tokens, shape.max_rank, shape.in_features,
                              sum(shape.slice_widths), shape.num_adapters, len(shape.slice_widths))
        assert bucket is not None
        if args.no_resume or bucket.key not in table.entries:
            pending.append((bucket.key, shape))
    logger.info("tuning %d buckets for %s into %s", len(pending), name, out)
    began = time.monotonic()
    done = 0
    for key, shape in tqdm(pending, desc="tune-kernels", unit="bucket"):
        if args.time_budget and time.monotonic() - began > args.time_budget:
            logger.warning("time budget spent: %d of %d buckets left for a resumed run",
                           len(pending) - done, len(pending))
            break
        config, times = tune_bucket(shape, DTYPES[args.dtype], device, num_sms,
                                    args.max_candidates, args.repeats, args.pair_shrinks)
        table.put(key, config, times)
        table.save(out)
        done += 1
    logger.info("tuned %d buckets; table has %d entries", done, len(table.entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
