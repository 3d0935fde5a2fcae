"""Which Triton LoRA kernel binaries the launcher can select for a layer shape (pure host code).

The Triton launcher (``valora.ops.triton_lora.lora_apply_triton``) picks a ``TileConfig`` per call
with ``select_tile_config(device, T, key rank, K, slice_widths, A, storage_rank=R)`` (``T``
tokens, ``A`` the active adapter count, or the worst case ``min(T, slots)`` when unknown; the
key rank below) and launches two kernels. Triton
compiles one binary per distinct *specialisation* of each kernel, on its first launch. What
makes a separate binary (read off ``launch_shrink`` / ``launch_expand`` and Triton's argument
specialisation):

- shrink: the layer's part (dtype and the specialisation of its integer constants:
  ``LoRALayerShape.shrink_spec``), ``block_m/n/k``, ``num_warps``, ``num_stages``,
  ``EVEN_K`` and the effective split ``split_k'`` (``lora_launch_args.shrink_split``; ``split_k``
  itself is not specialised), and the specialisation of ``split_stride = T · J·R``. Triton specialises an
  integer argument on ``== 1`` and on divisibility by 16 (``int_spec``) and a tensor on its
  dtype and 16-byte alignment; every other integer argument is a layer constant, a multiple of
  ``block_k``, or excluded with ``do_not_specialize``; floats are not specialised;
- expand: the layer's part (``LoRALayerShape.expand_spec``), its ``block_m/n/k``,
  ``num_warps``, ``num_stages``, the ``SPLIT_K`` constexpr
  (``lora_launch_args.expand_split_constexpr``), and the same
  ``split_stride`` specialisation.

Layers whose constants specialise alike share binaries (e.g. o_proj 4096→4096 and down_proj
11008→4096), so the warm-up de-duplicates across layer shapes too.

The launcher keys its lookup by a rank too: the storage rank ``R`` (batches whose slots the host
does not know: CUDA graphs), or ``tile_rank(effective rank, R)`` when it knows them (the largest
rank the batch's adapters use, rounded up to its rank bucket; ``key_ranks`` lists the values).
Batches whose slots the host does not know take the bucket's mix entry where the table has one
(``tile_table``, "Mix entries"); the enumeration adds those selections (``LoRAVariant.mix``).

``enumerate_lora_variants`` lists, for one layer shape, every (shrink, expand) pair of binaries
that any call with ``1 ≤ T ≤ max_tokens``, ``1 ≤ A ≤ min(T, max_adapters)`` and any key rank
selects, each with one representative ``(T, A, key rank)`` that selects it. It asks
``select_tile_config`` per *cell* of token and adapter buckets (``TOKEN_BUCKETS`` ×
``ADAPTER_BUCKETS`` of ``valora.ops.tile_config``) and key rank: a table (or nearest-neighbour)
answer depends on the buckets only, so one question per cell covers it, plus one representative
per ``split_stride`` specialisation present in the cell; a cell the heuristic answers (no table
for this GPU, no tuned neighbour, rank above the tables) is asked for every ``(T, A)`` in it
(about 10 µs a question: ~1 s per layer shape at 2048 tokens, 16 slots and 3 key ranks; with
a table, well under 0.1 s).
``plan_launches`` keeps a subset of the pairs that still covers every distinct shrink and expand
binary; ``valora.ops.warmup`` launches them. Nothing here touches the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from valora.ops.lora import LoRASlotWeights
from valora.ops.lora_launch_args import (
    expand_split_constexpr,
    persistent_expand_serves,
    persistent_split_constexpr,
    shrink_split,
    slice_groups,
)
from valora.ops.tile_config import ADAPTER_BUCKETS, TOKEN_BUCKETS, TileConfig, shape_bucket
from valora.ops.tile_table import select_tile_config, tile_rank

HEURISTIC = "heuristic"


def int_spec(value: int) -> str:
    """Triton's specialisation of a specialised integer argument: ``"1"`` (passed as a
    constant), ``"D"`` (divisible by 16) or ``""`` (neither), ``"i64"`` prefixed past int32."""
    wide = "i64" if value >= 2**31 else ""
    if value == 1:
        return "1"
    return wide + ("D" if value % 16 == 0 else "")


@dataclass(frozen=True)
class LoRALayerShape:
    """A LoRA layer as the kernels see it: input width, output slices, slot storage rank and
    dtype."""

    in_features: int
    slice_widths: tuple[int, ...]
    max_rank: int
    dtype: torch.dtype
    b_rank_major: bool = False
    """``lora_b`` stored rank-major (``LoRASlotWeights.b_rank_major``): other expand binaries."""

    @property
    def flat_rank(self) -> int:
        """Width of the rank-space buffer ``h``: every slice's storage rank side by side."""
        return len(self.slice_widths) * self.max_rank

    @classmethod
    def of(cls, weights: LoRASlotWeights) -> LoRALayerShape:
        return cls(int(weights.lora_a.shape[3]), tuple(weights.slice_widths), weights.max_rank,
                   weights.lora_a.dtype, weights.b_rank_major)

    def shrink_spec(self) -> tuple[object, ...]:
        """What the layer adds to a shrink binary: the dtype and the specialisation of
        ``num_slices``, ``in_features``, ``max_rank``, ``flat_rank`` and the row stride of
        ``x`` (``in_features``: contiguous rows). Layers that agree share binaries."""
        values = (len(self.slice_widths), self.in_features, self.max_rank, self.flat_rank,
                  self.in_features)
        return (str(self.dtype), *map(int_spec, values))

    def expand_spec(self) -> tuple[object, ...]:
        """What the layer adds to an expand binary: the dtype, the specialisation of
        ``num_slices``, ``max_rank``, ``flat_rank``, ``out_features``, the row stride of ``y``,
        per launch group (``lora_launch_args.slice_groups``) its slices' column offsets, and
        ``lora_b``'s layout when rank-major (``lora_launch_args.expand_b_layout``)."""
        widths = self.slice_widths
        groups = tuple(tuple(map(int_spec, cols)) for _, _, _, cols in slice_groups(widths, 1))
        out = sum(widths)
        values = (len(widths), self.max_rank, self.flat_rank, out, out)
        layout = ("rank-major",) if self.b_rank_major else ()
        return (str(self.dtype), *map(int_spec, values), groups, *layout)


@dataclass(frozen=True)
class _TileVariant:
    """What a shrink and an expand binary share: the layer's specialisation and the tile."""

    layer: tuple[object, ...]
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ShrinkVariant(_TileVariant):
    """One compiled ``lora_shrink_kernel`` (module docstring); ``layer``:
    ``LoRALayerShape.shrink_spec``, ``split_stride``: ``int_spec`` of ``T · flat_rank``."""

    even_k: bool
    split_stride: str
    correction: bool = False
    """The ``CORRECTION`` constexpr (mixed mode in one op, ``valora.ops.lora``)."""


@dataclass(frozen=True)
class ExpandVariant(_TileVariant):
    """The compiled ``lora_expand_kernel`` of one call (one binary per launch group, module
    docstring); ``layer``: ``LoRALayerShape.expand_spec``; ``split_k``: the ``SPLIT_K`` constexpr
    (0: run-time split loop); ``split_stride``: ``int_spec`` of ``T · flat_rank``."""

    split_k: int
    split_stride: str
    correction: bool = False
    """The ``CORRECTION`` constexpr."""
    early_y: bool = False
    """The ``EARLY_Y`` constexpr (``ExpandConfig.early_y``)."""
    persistent: int = 0
    """> 0: ``lora_expand_persistent_kernel`` instead, with this ``CHUNKS`` constexpr (storage
    rank over ``block_k``, rounded up; ``lora_launch_args.persistent_expand_serves``: a ``persistent``
    config over rank-major ``B`` without correction; ``early_y`` then unused)."""


@dataclass(frozen=True)
class LoRAVariant:
    """A (shrink, expand) pair of binaries and one call that selects it: ``num_tokens`` tokens
    over ``num_adapters`` active adapters of a ``shape`` layer, keyed by rank ``key_rank``, pick
    ``config``."""

    shrink: ShrinkVariant
    expand: ExpandVariant
    config: TileConfig
    num_tokens: int
    num_adapters: int
    key_rank: int
    shape: LoRALayerShape
    correction: bool = False
    """A mixed-mode call with the correction in the same op (``h`` rows ``2·J·R`` wide)."""
    mix: bool = False
    """A call whose slots the host does not know (a CUDA-graph replay), served by a mix entry
    (``tile_table``); ``num_adapters`` is then the worst case ``min(T, slots)``."""

    @property
    def key(self) -> tuple[ShrinkVariant, ExpandVariant]:
        return self.shrink, self.expand


def kernel_variants(shape: LoRALayerShape, config: TileConfig, num_tokens: int,
                    correction: bool = False) -> tuple[ShrinkVariant, ExpandVariant]:
    """The binaries a call of ``num_tokens`` tokens launched with ``config`` runs (what
    ``launch_shrink`` / ``launch_expand`` of ``valora.ops.triton_lora`` pass as specialised
    arguments and constexprs); ``correction``: a batch with the mixed-mode correction, whose
    ``h`` rows (and so ``split_stride``) are twice as wide."""

    shrink, expand = config.shrink, config.expand
    split_k, even_k = shrink_split(shape.in_features, shrink)
    stride = int_spec(num_tokens * shape.flat_rank * (2 if correction else 1))
    persistent = (-(-shape.max_rank // expand.block_k)
                  if persistent_expand_serves(expand, shape.b_rank_major, correction) else 0)
    return (
        ShrinkVariant(shape.shrink_spec(), shrink.block_m, shrink.block_n, shrink.block_k,
                      shrink.num_warps, shrink.num_stages, even_k, stride, correction),
        ExpandVariant(shape.expand_spec(), expand.block_m, expand.block_n, expand.block_k,
                      expand.num_warps, expand.num_stages,
                      (persistent_split_constexpr if persistent else expand_split_constexpr)(
                          split_k, expand), stride, correction,
                      expand.early_y and not persistent, persistent),
    )


def key_ranks(storage_rank: int) -> tuple[int, ...]:
    """Every rank the launcher may key a layer's lookup by: ``tile_rank(r, storage_rank)`` of
    each effective rank ``1..storage_rank`` (the storage rank itself among them), ascending."""
    return tuple(sorted({tile_rank(rank, storage_rank) for rank in range(1, storage_rank + 1)}))


def _runs(bounds: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """``1..limit`` split into inclusive runs that round up to the same bucket of ``bounds``
    (values above the last bound share its bucket)."""
    runs: list[tuple[int, int]] = []
    low = 1
    for bound in bounds:
        if low > limit:
            break
        if bound >= low:
            runs.append((low, min(bound, limit)))
            low = bound + 1
    if low <= limit:
        if runs:
            runs[-1] = (runs[-1][0], limit)
        else:
            runs.append((low, limit))
    return runs


def _stride_classes(low: int, high: int) -> range:
    """The last 16 token counts of ``low..high``, descending: within one bucket (one config) the
    token count moves only the ``split_stride`` specialisation, and 16 consecutive counts show
    all its classes."""
    return range(high, max(low, high - 15) - 1, -1)


def _cell_calls(shape: LoRALayerShape, rank: int, tokens: tuple[int, int],
                adapters: tuple[int, int], max_adapters: int,
                device: torch.device) -> Iterator[tuple[int, int, TileConfig, bool]]:
    """``(T, A, config, False)`` for calls keyed by ``rank`` of one token-run × adapter-run cell that
    together select every binary any such call of the cell selects (module docstring)."""
    t_low, t_high = tokens
    a_low, a_high = adapters
    t_first = max(t_low, a_low)  # A ≤ T: smaller T have no adapter count in this run
    if t_first > t_high or a_low > min(a_high, t_high, max_adapters):
        return

    def top(num_tokens: int) -> int:
        return min(a_high, num_tokens, max_adapters)

    def select(num_tokens: int, num_adapters: int) -> tuple[TileConfig, str]:
        return select_tile_config(device, num_tokens, rank, shape.in_features, shape.slice_widths,
                                  num_adapters, storage_rank=shape.max_rank)

    config, source = select(t_high, top(t_high))
    out_features = sum(shape.slice_widths)
    slices = len(shape.slice_widths)
    first = shape_bucket(t_first, rank, shape.in_features, out_features, a_low, slices)
    last = shape_bucket(t_high, rank, shape.in_features, out_features, top(t_high), slices)
    if source != HEURISTIC and first is not None and first == last:
        # One bucket: one config (``_stride_classes``).
        for num_tokens in _stride_classes(t_first, t_high):
            yield num_tokens, top(num_tokens), config, False
        return
    for num_tokens in range(t_first, t_high + 1):
        for num_adapters in range(a_low, top(num_tokens) + 1):
            yield num_tokens, num_adapters, select(num_tokens, num_adapters)[0], False


def _mix_calls(shape: LoRALayerShape, tokens: tuple[int, int], max_adapters: int,
               device: torch.device) -> Iterator[tuple[int, int, TileConfig, bool]]:
    """``(T, A, config, True)`` for the calls of one token run whose slots the host does not know
    (key rank = storage rank, ``A = min(T, slots)``) that a mix entry serves
    (``tile_table``, "Mix entries"); nothing where the run's bucket has none — those calls take
    the worst-case answer the other cells cover."""
    for num_tokens in _stride_classes(*tokens):
        adapters = min(num_tokens, max_adapters)
        config, source = select_tile_config(device, num_tokens, shape.max_rank,
                                            shape.in_features, shape.slice_widths, adapters,
                                            storage_rank=shape.max_rank, mix=True)
        if source != "mix":
            return
        yield num_tokens, adapters, config, True


def enumerate_lora_variants(shape: LoRALayerShape, max_tokens: int, max_adapters: int,
                            device: torch.device, ranks: Iterable[int] | None = None,
                            correction: bool = False) -> list[LoRAVariant]:
    """Every distinct (shrink, expand) binary pair that a call of ``1..max_tokens`` tokens with
    ``1..min(T, max_adapters)`` active adapters, keyed by any rank of ``ranks`` (default
    ``key_ranks(shape.max_rank)``: every rank the launcher may use), selects on ``device`` —
    pass the slot count as ``max_adapters``: it is also the worst case ``min(T, slots)`` of calls
    whose adapter count is unknown — each with the first call found that selects it.
    ``correction``: the same for batches carrying the mixed-mode correction (the tile choice
    is the same; the binaries differ). Never touches the GPU."""
    found: dict[tuple[ShrinkVariant, ExpandVariant], LoRAVariant] = {}
    checked: set[tuple[TileConfig, str]] = set()  # kernel_variants depends on T via this only
    if max_tokens < 1 or max_adapters < 1:
        return []
    for rank in key_ranks(shape.max_rank) if ranks is None else ranks:
        for tokens in _runs(TOKEN_BUCKETS, max_tokens):
            cells = [_cell_calls(shape, rank, tokens, adapters, max_adapters, device)
                     for adapters in _runs(ADAPTER_BUCKETS, max_adapters)]
            if rank == shape.max_rank:  # calls whose slots the host does not know
                cells.append(_mix_calls(shape, tokens, max_adapters, device))
            for num_tokens, num_adapters, config, mix in (c for cell in cells for c in cell):
                width = shape.flat_rank * (2 if correction else 1)
                seen = (config, int_spec(num_tokens * width))
                if seen in checked:
                    continue
                checked.add(seen)
                shrink, expand = kernel_variants(shape, config, num_tokens, correction)
                if (shrink, expand) not in found:
                    found[shrink, expand] = LoRAVariant(
                        shrink, expand, config, num_tokens, num_adapters, rank, shape,
                        correction, mix)
    return list(found.values())


def plan_launches(variants: Sequence[LoRAVariant]) -> list[LoRAVariant]:
    """A subset of ``variants`` whose launches still compile every distinct shrink and expand
    binary among them: pairs that bring two new binaries first, then pairs that bring one."""
    shrinks: set[ShrinkVariant] = set()
    expands: set[ExpandVariant] = set()
    chosen: list[LoRAVariant] = []
    for both_new in (True, False):
        for variant in variants:
            new_shrink = variant.shrink not in shrinks
            new_expand = variant.expand not in expands
            if (new_shrink and new_expand) if both_new else (new_shrink or new_expand):
                chosen.append(variant)
                shrinks.add(variant.shrink)
                expands.add(variant.expand)
    return chosen


def plan_warm_up(shapes: Mapping[LoRALayerShape, int], max_tokens: int, device: torch.device,
                 corrections: Iterable[bool] = (False,)
                 ) -> tuple[list[LoRAVariant], list[LoRAVariant]]:
    """``(variants, launches)`` for layers of the given shapes, each with its adapter bound
    (``enumerate_lora_variants``, once per value of ``corrections``): the distinct (shrink,
    expand) pairs over all shapes (a pair two shapes share is listed once) and the
    ``plan_launches`` subset that compiles them all. Never touches the GPU."""
    found: dict[tuple[ShrinkVariant, ExpandVariant], LoRAVariant] = {}
    for correction in corrections:
        for shape, max_adapters in shapes.items():
            for variant in enumerate_lora_variants(shape, max_tokens, max_adapters, device,
                                                   correction=correction):
                found.setdefault(variant.key, variant)
    variants = list(found.values())
    return variants, plan_launches(variants)
