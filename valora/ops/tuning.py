"""``valora tune-kernels``: profile LoRA tile configurations on this GPU and write its table.

For every shape bucket (tokens × rank × layer × adapters in the batch) the tuner builds a random
problem at the bucket's shape (uniform rank, uniform popularity), times every shrink candidate
under CUDA graphs with rotating inputs, then every expand candidate on the best shrink's output;
the best expand is then timed after the next-best shrinks too (fewer split-K planes make the
expand cheaper), and the pair with the smallest sum wins. Winners are stored under the bucket key in
``valora/ops/tables/<GPU>.json`` (or ``--out``), each with the ``lora_b`` layout its problems were
stored in (``VALORA_LORA_B_LAYOUT``, ``valora.ops.lora.lora_b_layout``: tune with the layout the
engine will run). The table is written after each bucket; a rerun skips the buckets already
tuned on the current layout (resume: an entry tuned on the other layout, or before layouts were
recorded, is tuned again) unless ``--no-resume`` (every bucket of the selection). ``--time-budget``
stops cleanly between buckets, so a long re-tune runs as several calls. A progress bar shows the
way.

``--mix`` tunes the *mix* entries instead (``valora.ops.tile_table``, "Mix entries": the tiles of
calls whose slots the host does not know, as in CUDA-graph replays): per bucket (``--ranks``
read as slot storage ranks, ``--adapters`` as slot counts), one problem per kind of batch a
replay may carry — ``one`` adapter (rank 16, or the storage rank below it), a ``few`` (up to 8,
uniform), ``all`` (one per token, up to the slot count) — over slots of mixed ranks (8, 16, …
up to the storage rank), no host hints (as graph segments); each candidate's time is the sum
over the kinds (the expected time of a replay drawn uniformly from them), and the same
shrink → expand → pairs search picks the winner, stored under ``"mix:" + bucket key``.

``--skinny`` tunes the skinny GEMM of the base projections instead (``valora.ops.skinny_tuning``:
cuBLAS and every fitting tile per token bucket ≤ 32 and layer shape; entries ``"skinny:..."``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm
from triton.runtime.errors import OutOfResources

from valora.logger import get_logger
from valora.ops.lora import LoRASlotWeights, lora_b_layout, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.skinny_gemm import (
    SKINNY_MAX_TOKENS,
    skinny_key,
    skinny_token_bucket,
    smem_limit,
)
from valora.ops.skinny_tuning import tune_skinny
from valora.ops.tile_candidates import expand_candidates, shrink_candidates
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig, shape_bucket
from valora.ops.tile_table import MIX_PREFIX, TABLE_DIR, TileTable, table_file_name
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
    parser.add_argument("--no-resume", action="store_true",
                        help="re-tune buckets already in the table (by default only those tuned "
                             "on another lora_b layout are)")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = no limit")
    parser.add_argument("--max-candidates", type=int, default=0, help="per kernel; 0 = all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mix", action="store_true",
                        help="tune the mix entries (tiles for CUDA-graph replays, whose slots "
                             "the host does not know): --ranks are storage ranks, --adapters "
                             "slot counts")
    parser.add_argument("--skinny", action="store_true",
                        help="tune the skinny GEMM of the base projections instead "
                             "(valora.ops.skinny_tuning): --tokens up to 32, --layers' shapes")
    parser.add_argument("--pair-shrinks", type=int, default=3,
                        help="shrinks (best first) whose output the best expand is timed on")
    return parser.parse_args(argv)


def _layer_specs(args: argparse.Namespace) -> list[tuple[int, tuple[int, ...]]]:
    """``--layers`` as ``(in_features, slice widths)``: names split by ``,``; ``IN:W1,W2`` specs
    by ``;``."""
    specs = args.layers.split(";") if ";" in args.layers or ":" in args.layers \
        else args.layers.split(",")
    return [_layer(spec) for spec in specs]


def _shapes(args: argparse.Namespace) -> list[TuneShape]:
    shapes: dict[str, TuneShape] = {}
    for in_features, widths in _layer_specs(args):
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


MIX_KINDS = ("one", "few", "all")
"""The kinds of batch a mix entry is tuned over (module docstring)."""
MIX_RANKS = (8, 16, 32, 64, 128, 256)


def mix_slot_ranks(storage_rank: int, num_slots: int) -> list[int]:
    """Slot ranks of a mix problem: ``MIX_RANKS`` below the storage rank, then the storage rank,
    repeated over the slots (slot 0 has rank 8, or the storage rank when that is smaller)."""
    ranks = [r for r in MIX_RANKS if r < storage_rank] + [storage_rank]
    return [ranks[s % len(ranks)] for s in range(num_slots)]


def token_slots_of(kind: str, shape: TuneShape, slot_ranks: list[int],
                   generator: torch.Generator) -> torch.Tensor:
    """The token slots of one problem: ``uniform`` (a regular bucket: uniform over its
    adapters), or a mix kind (``MIX_KINDS``)."""
    tokens, slots = shape.num_tokens, shape.num_adapters
    if kind == "uniform":
        return make_token_slots(tokens, slots, "uniform", generator)
    if kind == "one":  # the slot whose rank is nearest 16
        target = min(16, shape.max_rank)
        slot = min(range(len(slot_ranks)), key=lambda s: abs(slot_ranks[s] - target))
        return torch.full((tokens,), slot, dtype=torch.int32)
    if kind == "few":
        return make_token_slots(tokens, min(8, slots), "uniform", generator)
    if kind == "all":
        return make_token_slots(tokens, slots, "distinct", generator)
    raise ValueError(f"unknown problem kind {kind!r}")


def _problems(shape: TuneShape, dtype: torch.dtype, device: torch.device,
              seed: int, kind: str = "uniform") -> list[InputSet]:
    """Rotating input sets for one bucket and kind of batch (``token_slots_of``; ``uniform``:
    every slot at the bucket's rank, the host's hints set; a mix kind: ``mix_slot_ranks``, no
    hints): enough that their calls together touch
    ``ROTATE_BYTES`` (operands cold in L2, as in a model step; at most ``MAX_ROTATIONS``).

    A call touches its tokens' activations and the factors of the adapters its tokens use (not
    the whole slot storage): counting the storage instead gave one set for most large buckets,
    whose replays then read adapters left in L2 and favoured configurations that lose when the
    operands come from memory."""
    generator = torch.Generator().manual_seed(seed)
    width = sum(shape.slice_widths)
    item = torch.tensor([], dtype=dtype).element_size()
    slot_ranks = ([shape.max_rank] * shape.num_adapters if kind == "uniform"
                  else mix_slot_ranks(shape.max_rank, shape.num_adapters))
    slot_sets = [token_slots_of(kind, shape, slot_ranks, generator)]
    used = set(slot_sets[0].tolist())
    touched = item * (shape.num_tokens * (shape.in_features + 2 * width)
                      + sum(slot_ranks[s] for s in used)
                      * (shape.in_features * len(shape.slice_widths) + width))
    storage = item * shape.num_adapters * shape.max_rank * (
        shape.in_features * len(shape.slice_widths) + width)
    rotations = rotations_for(touched, set_bytes=storage)
    sets: list[InputSet] = []
    for i in range(rotations):
        weights = make_slot_weights(slot_ranks, shape.in_features, shape.slice_widths, dtype,
                                    device, seed + i, max_rank=shape.max_rank)
        if i >= len(slot_sets):
            slot_sets.append(token_slots_of(kind, shape, slot_ranks, generator))
        batch = prepare_lora_batch(slot_sets[i].to(device), shape.num_adapters, "triton",
                                   num_active_slots=(shape.num_adapters if kind == "uniform"
                                                     else None))
        x = torch.randn(shape.num_tokens, shape.in_features, device=device, dtype=dtype)
        y = torch.randn(shape.num_tokens, width, device=device, dtype=dtype)
        assert isinstance(batch.backend_data, LoRASegments)
        sets.append(InputSet(x, y, weights, batch.backend_data))
    return sets


def tune_bucket(shape: TuneShape, dtype: torch.dtype, device: torch.device, num_sms: int,
                max_candidates: int, repeats: int, pair_shrinks: int = 1,
                kinds: tuple[str, ...] = ("uniform",)) -> tuple[TileConfig, dict[str, float]]:
    """Time the candidates for one shape (module docstring): shrink, expand, pairs; with several
    ``kinds`` of problem (``--mix``), a configuration's time is its sum over them."""
    seed = shape.num_tokens * 7919 + shape.max_rank
    problems = [_problems(shape, dtype, device, seed, kind) for kind in kinds]
    args = (shape.num_tokens, shape.max_rank)
    shrinks = shrink_candidates(*args, shape.in_features, shape.num_adapters,
                                len(shape.slice_widths), num_sms)
    expands = expand_candidates(*args, max(shape.slice_widths), shape.num_adapters,
                                shape.in_features, len(shape.slice_widths), num_sms)
    if max_candidates > 0:
        shrinks, expands = shrinks[:max_candidates], expands[:max_candidates]

    def shrink_us(cfg: ShrinkConfig) -> float:
        return sum(time_calls([partial(launch_shrink, s.x, s.weights, s.segments, cfg)
                               for s in sets], device, repeats=repeats).median_us
                   for sets in problems)

    def timed(what: Callable[[], float], cfg: object) -> float:
        """``what()``, or infinity for a candidate this GPU cannot run (too much shared memory
        for its tiles, stages and split-K planes): skipped, not fatal."""
        try:
            return what()
        except OutOfResources as exc:
            logger.debug("candidate %s does not fit this GPU: %s", cfg, exc)
            return math.inf

    def outputs(cfg: ShrinkConfig) -> list[list[torch.Tensor]]:
        return [[launch_shrink(s.x, s.weights, s.segments, cfg) for s in sets]
                for sets in problems]

    def expand_us(ecfg: ExpandConfig, partials: list[list[torch.Tensor]]) -> float:
        return sum(time_calls([partial(launch_expand, h, s.y, s.weights, s.segments, ecfg, 1.0)
                               for s, h in zip(sets, hs, strict=True)], device,
                              repeats=repeats).median_us
                   for sets, hs in zip(problems, partials, strict=True))

    shrink_times = {cfg: timed(partial(shrink_us, cfg), cfg) for cfg in shrinks}
    best_shrink = min(shrink_times, key=shrink_times.__getitem__)
    partials = outputs(best_shrink)
    expand_times = {ecfg: timed(partial(expand_us, ecfg, partials), ecfg) for ecfg in expands}
    best_expand = min(expand_times, key=expand_times.__getitem__)
    if math.isinf(shrink_times[best_shrink]) or math.isinf(expand_times[best_expand]):
        raise RuntimeError(f"no tile candidate of {shape} runs on this GPU")
    times = {"shrink": shrink_times[best_shrink], "expand": expand_times[best_expand],
             "shrink_heuristic": shrink_times[shrinks[0]],
             "expand_heuristic": expand_times[expands[0]]}
    pair_total = times["shrink"] + times["expand"]
    for cfg in sorted(shrink_times, key=shrink_times.__getitem__)[1:max(1, pair_shrinks)]:
        if math.isinf(shrink_times[cfg]):
            break
        expand_after = timed(partial(expand_us, best_expand, outputs(cfg)), best_expand)
        if shrink_times[cfg] + expand_after < pair_total:
            best_shrink, pair_total = cfg, shrink_times[cfg] + expand_after
            times.update(shrink=shrink_times[cfg], expand=expand_after)
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
    if args.skinny:
        return _tune_skinny(args, device, name, out, table)
    pending = []
    for shape in _shapes(args):
        bucket = shape_bucket(shape.num_tokens, shape.max_rank, shape.in_features,
                              sum(shape.slice_widths), shape.num_adapters, len(shape.slice_widths))
        assert bucket is not None
        key = MIX_PREFIX + bucket.key if args.mix else bucket.key
        if args.no_resume or table.entry_layout(key) != lora_b_layout():
            pending.append((key, shape))
    logger.info("tuning %d buckets for %s into %s", len(pending), name, out)
    began = time.monotonic()
    done = 0
    for key, shape in tqdm(pending, desc="tune-kernels", unit="bucket"):
        if args.time_budget and time.monotonic() - began > args.time_budget:
            logger.warning("time budget spent: %d of %d buckets left for a resumed run",
                           len(pending) - done, len(pending))
            break
        config, times = tune_bucket(shape, DTYPES[args.dtype], device, num_sms,
                                    args.max_candidates, args.repeats, args.pair_shrinks,
                                    MIX_KINDS if args.mix else ("uniform",))
        table.put(key, config, times, lora_b_layout())
        table.save(out)
        done += 1
    logger.info("tuned %d buckets; table has %d entries", done, len(table.entries))
    return 0


def _tune_skinny(args: argparse.Namespace, device: torch.device, name: str, out: Path,
                 table: TileTable) -> int:
    """``--skinny`` (``valora.ops.skinny_tuning``): one entry a token bucket × layer shape."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for in_features, widths in _layer_specs(args):
        for tokens in args.tokens:
            if tokens <= SKINNY_MAX_TOKENS:
                shapes.setdefault(skinny_key(tokens, in_features, sum(widths)),
                                  (skinny_token_bucket(tokens), in_features, sum(widths)))
    pending = [(k, v) for k, v in shapes.items() if args.no_resume or k not in table.entries]
    logger.info("tuning %d skinny GEMM shapes for %s into %s", len(pending), name, out)
    began = time.monotonic()
    for done, (key, (tokens, in_features, out_features)) in enumerate(
            tqdm(pending, desc="tune-kernels --skinny", unit="shape")):
        if args.time_budget and time.monotonic() - began > args.time_budget:
            logger.warning("time budget spent: %d of %d shapes left for a resumed run",
                           len(pending) - done, len(pending))
            break
        table.put_record(key, tune_skinny(tokens, in_features, out_features, DTYPES[args.dtype],
                                          device, args.max_candidates, args.repeats,
                                          smem_limit(device)))
        table.save(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
