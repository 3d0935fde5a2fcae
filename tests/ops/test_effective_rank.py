"""Tile choice by the batch's effective rank (CPU: Triton interpreter).

The launcher keys its tile lookup by the largest rank the batch's active slots use (rounded up to
a rank bucket) when the host knows the slots, trims the shrink grid to the live rank prefix and
skips layers no active slot targets; with unknown slots it keeps the storage rank. Results must
equal the pure-PyTorch twin whatever the tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error

from valora.errors import ValoraError
from valora.ops import triton_lora
from valora.ops.lora import (
    LoRABatch,
    LoRASlotWeights,
    _active_slot_set,
    lora_apply,
    prepare_lora_batch,
)
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import (
    ExpandConfig,
    ShrinkConfig,
    TileConfig,
    heuristic_config,
    shape_bucket,
)
from valora.ops.tile_table import TileTable, select_from_table, tile_rank

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN_FEATURES = 48
SMALL = TileConfig(ShrinkConfig(16, 16, 16, 2, 4, 2), ExpandConfig(16, 16, 16, 4, 2))
LARGE = TileConfig(ShrinkConfig(32, 64, 32, 1, 4, 2), ExpandConfig(32, 32, 32, 4, 2))


class Spy:
    """Records the tile configs, live ranks and shrink grids of ``lora_apply_triton`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, table: TileTable | None = None) -> None:
        self.keys: list[tuple[int, int | None]] = []  # (key rank, storage rank) per lookup
        self.shrinks: list[tuple[ShrinkConfig, int | None]] = []
        self.expands: list[ExpandConfig] = []
        self.grids: list[tuple[int, ...]] = []
        shrink, expand = triton_lora.launch_shrink, triton_lora.launch_expand
        kernel = triton_lora.lora_shrink_kernel
        spy = self

        def select(device: torch.device, num_tokens: int, max_rank: int, in_features: int,
                   slice_widths: tuple[int, ...], num_adapters: int,
                   storage_rank: int | None = None,
                   mix: bool = False) -> tuple[TileConfig, str]:
            self.keys.append((max_rank, storage_rank))
            return select_from_table(table, 132, num_tokens, max_rank, in_features, slice_widths,
                                     num_adapters, storage_rank, mix)

        def launch_shrink(x: torch.Tensor, weights: LoRASlotWeights, segments: LoRASegments,
                          cfg: ShrinkConfig, live_rank: int | None = None,
                          **launch: Any) -> torch.Tensor:
            self.shrinks.append((cfg, live_rank))
            return shrink(x, weights, segments, cfg, live_rank, **launch)

        def launch_expand(h: torch.Tensor, y: torch.Tensor, weights: LoRASlotWeights,
                          segments: LoRASegments, cfg: ExpandConfig, mult: float,
                          **launch: Any) -> None:
            self.expands.append(cfg)
            expand(h, y, weights, segments, cfg, mult, **launch)

        class Kernel:
            def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
                spy.grids.append(grid)
                return kernel[grid]

        monkeypatch.setattr(triton_lora, "select_tile_config", select)
        monkeypatch.setattr(triton_lora, "launch_shrink", launch_shrink)
        monkeypatch.setattr(triton_lora, "launch_expand", launch_expand)
        interpreted = triton_lora.kernels_interpreted()  # it looks at the kernel's type
        monkeypatch.setattr(triton_lora, "kernels_interpreted", lambda: interpreted)
        monkeypatch.setattr(triton_lora, "lora_shrink_kernel", Kernel())


def _case(ranks: list[list[int]], slices: tuple[int, ...], storage: int, slots: list[int],
          dtype: torch.dtype = torch.float32, seed: int = 0
          ) -> tuple[LoRASlotWeights, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights stored at rank ``storage`` (1e3 poison above each rank), inputs, token slots."""
    weights = make_slot_weights(ranks, IN_FEATURES, slices, dtype, DEVICE, seed, max_rank=storage)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(slots), IN_FEATURES, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(len(slots), sum(slices), generator=generator)).to(DEVICE, dtype)
    return weights, x, y, torch.tensor(slots, dtype=torch.int32, device=DEVICE)


def _prepare(token_slots: torch.Tensor, num_slots: int) -> LoRABatch:
    """A batch whose active slots the host knows, as the engine builds it (on a CPU tensor they
    are derived; on a device tensor the caller passes them: nothing may read the device)."""
    active = {int(s) for s in token_slots.tolist() if s >= 0}
    return prepare_lora_batch(token_slots, num_slots, "triton", active_slots=active)


def _run(weights: LoRASlotWeights, x: torch.Tensor, y: torch.Tensor,
         batch: LoRABatch) -> torch.Tensor:
    out = y.clone()
    lora_apply(out, x, weights, batch)
    return out


def _check(out: torch.Tensor, y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
           slots: torch.Tensor) -> None:
    ref = reference_output(y, x, weights, slots, weights.num_slots)
    assert relative_error(out, ref) <= TOLERANCE[x.dtype]
    none = (slots < 0).to(out.device)
    assert bool(none.any()), "the case must hold rows without adapter"
    assert torch.equal(out[none], y[none]), "rows without adapter changed"


def _shrink_grid(segments: object, cfg: ShrinkConfig, live: int) -> int:
    assert isinstance(segments, LoRASegments)
    split_k = max(1, min(cfg.split_k, -(-IN_FEATURES // cfg.block_k)))
    return segments.tile_bound(cfg.block_m) * split_k * -(-live // cfg.block_n)


def _unknown_slots_batch(slots: torch.Tensor, num_slots: int) -> LoRABatch:
    """A batch as CUDA-graph capture builds it: segments updated from the device slots only."""
    segments = LoRASegments.allocate(int(slots.shape[0]), num_slots, DEVICE)
    segments.update(slots.to(DEVICE))
    return LoRABatch(token_slots=slots.to(DEVICE), num_slots=num_slots, backend="triton",
                     backend_data=segments)


def test_tile_rank_rounds_up_to_buckets_within_storage() -> None:
    assert [tile_rank(r, 128) for r in (0, 1, 5, 16, 17, 32, 33, 64, 65, 127, 128, 200)] == \
        [16, 16, 16, 16, 32, 32, 64, 64, 128, 128, 128, 128]
    assert tile_rank(5, 8) == 8 and tile_rank(16, 8) == 8  # never above the storage rank
    assert tile_rank(200, 512) == 256 and tile_rank(300, 512) == 300  # above the tables: as is
    for rank in (1, 7, 16, 24, 100):
        expected = shape_bucket(4, rank, 64, 64, 1, 1)
        got = shape_bucket(4, tile_rank(rank, 128), 64, 64, 1, 1)
        assert expected is not None and got == expected


def _select(table: TileTable | None, rank: int,
            storage: int | None = None) -> tuple[TileConfig, str]:
    return select_from_table(table, 132, 4, rank, 64, (64,), 1, storage_rank=storage)


def test_rank_walk_takes_the_smallest_tuned_rank_up_to_storage() -> None:
    r16, r64 = shape_bucket(4, 16, 64, 64, 1, 1), shape_bucket(4, 64, 64, 64, 1, 1)
    assert r16 is not None and r64 is not None
    table = TileTable("test")
    table.put(r64.key, LARGE, {})
    assert _select(table, 16, 128) == (LARGE, "nearest")
    assert _select(table, 16, 64) == (LARGE, "nearest")
    # Without a storage rank above the key (or up to the tuned rank) there is no walk.
    assert _select(table, 16)[1] == "heuristic"
    assert _select(table, 16, 32)[1] == "heuristic"
    table.put(r16.key, SMALL, {})
    assert _select(table, 16, 128) == (SMALL, "table")
    assert _select(None, 16, 128) == (heuristic_config(4, 16, 64, 64, 1, 1, 132), "heuristic")


def test_rank16_adapters_in_rank64_storage_take_the_rank16_entry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slots = [0, 1, -1, 1, 0, -1, 2]
    weights, x, y, token_slots = _case([[16], [9], [3], [64]], (40,), 64, slots)
    table = TileTable("test")
    for rank, config in ((16, SMALL), (64, LARGE)):
        bucket = shape_bucket(len(slots), rank, IN_FEATURES, 40, 3, 1)
        assert bucket is not None
        table.put(bucket.key, config, {})
    spy = Spy(monkeypatch, table)
    batch = _prepare(token_slots, weights.num_slots)
    assert batch.active_slots == (0, 1, 2)
    out = _run(weights, x, y, batch)
    assert spy.keys == [(16, 64)]
    assert spy.shrinks == [(SMALL.shrink, 16)] and spy.expands == [SMALL.expand]
    _check(out, y, x, weights, token_slots)
    # Slot 3 (rank 64) joins: the storage entry, the whole rank axis.
    slots[2] = 3
    token_slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    spy.keys.clear()
    spy.shrinks.clear()
    out = _run(weights, x, y, _prepare(token_slots, weights.num_slots))
    assert spy.keys == [(64, 64)] and spy.shrinks == [(LARGE.shrink, 64)]
    ref = reference_output(y, x, weights, token_slots, weights.num_slots)
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]


MIXED_CASES = {
    # slices, storage, per-slot ranks (slot 4 inactive and high), live flat rank L
    "one_slice": ((40,), 32, [[1], [7], [13], [0], [30]], 13),
    "qkv": ((24, 8, 8), 24, [[1, 3, 0], [5, 0, 0], [11, 1, 2], [0, 0, 0], [24, 24, 24]],
            2 * 24 + 2),
    "last_slice_untargeted": ((16, 24), 20, [[3, 0], [1, 0], [17, 0], [6, 0], [20, 20]], 17),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(MIXED_CASES))
def test_mixed_ranks_match_the_reference_on_the_effective_path(
        monkeypatch: pytest.MonkeyPatch, case: str, dtype: torch.dtype) -> None:
    slices, storage, ranks, live = MIXED_CASES[case]
    slots = [0, 2, -1, 1, 3, 0, -1, 2, 2, 1, -1, 3, 0]
    weights, x, y, token_slots = _case(ranks, slices, storage, slots, dtype, seed=5)
    spy = Spy(monkeypatch)
    batch = _prepare(token_slots, weights.num_slots)
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments) and segments.active_slots == (0, 1, 2, 3)
    expected = tuple(max(ranks[s][j] for s in range(4)) for j in range(len(slices)))
    assert triton_lora.active_slice_ranks(weights, segments) == expected
    out = _run(weights, x, y, batch)
    assert spy.keys == [(tile_rank(max(expected), storage), storage)]
    ((cfg, live_rank),) = spy.shrinks
    assert live_rank == live < len(slices) * storage
    assert spy.grids == [(_shrink_grid(segments, cfg, live),)]
    _check(out, y, x, weights, token_slots)


@pytest.mark.parametrize("no_mirror", [False, True])
def test_unknown_slots_or_mirror_keep_the_storage_rank(monkeypatch: pytest.MonkeyPatch,
                                                       no_mirror: bool) -> None:
    slots = [1, -1, 0, 1, 1, -1]
    weights, x, y, token_slots = _case([[2, 5], [3, 1], [32, 32]], (8, 16), 32, slots)
    if no_mirror:
        weights.ranks_cpu = []
        batch = _prepare(token_slots, weights.num_slots)
        assert batch.active_slots == (0, 1)
    else:
        batch = _unknown_slots_batch(token_slots, weights.num_slots)
        assert batch.active_slots is None and batch.num_active_slots == -1
    spy = Spy(monkeypatch)
    out = _run(weights, x, y, batch)
    assert spy.keys == [(32, 32)]
    assert [live for _, live in spy.shrinks] == [None]
    assert spy.grids == [(_shrink_grid(batch.backend_data, spy.shrinks[0][0], 2 * 32),)]
    _check(out, y, x, weights, token_slots)


def test_segment_update_without_hints_forgets_the_active_slots() -> None:
    """A CUDA graph reuses its segments with ``update(slots)``: hints must not leak across."""
    slots = torch.tensor([0, 1, -1], dtype=torch.int32)
    batch = prepare_lora_batch(slots, 2, "triton")
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments) and segments.active_slots == (0, 1)
    segments.update(slots)
    assert segments.active_slots is None and segments.num_active_slots == -1


def test_no_active_slot_targets_the_layer_skips_the_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Active adapters target other layers only (rank 0 here): y is untouched, nothing runs —
    exactly what the kernels do when they do run (the unknown-slots path)."""
    slots = [0, -1, 2, 0, -1]
    weights, x, y, token_slots = _case([[0, 0], [4, 4], [0, 0]], (8, 16), 8, slots)
    spy = Spy(monkeypatch)
    skipped = _run(weights, x, y, _prepare(token_slots, weights.num_slots))
    assert spy.shrinks == [] and spy.expands == [] and spy.grids == []
    assert torch.equal(skipped, y)
    launched = _run(weights, x, y, _unknown_slots_batch(token_slots, weights.num_slots))
    assert len(spy.shrinks) == 1 and len(spy.expands) == 1
    assert torch.equal(launched, skipped)
    # Slot 1 (rank 4) joins: it runs, and only its row changes.
    token_slots[1] = 1
    out = _run(weights, x, y, _prepare(token_slots, weights.num_slots))
    assert len(spy.shrinks) == 2
    changed = (out != y).any(dim=1).tolist()
    assert changed == [False, True, False, False, False]
    ref = reference_output(y, x, weights, token_slots, weights.num_slots)
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]


def test_active_slice_ranks_reads_only_the_mirror() -> None:
    weights = make_slot_weights([[3, 0], [9, 2], [40, 1]], 16, (8, 8), torch.float32, "cpu", 0,
                                max_rank=64)
    weights.ranks = torch.empty(0)  # any read of the device ranks would fail
    assert weights.active_slice_ranks((0, 1)) == (9, 2)
    assert weights.active_slice_ranks((0,)) == (3, 0)
    assert weights.active_slice_ranks(()) == (0, 0)
    weights.ranks_cpu[2] = [99, 1]  # clamped to the storage rank, as the kernels clamp
    assert weights.active_slice_ranks((2,)) == (64, 1)
    weights.ranks_cpu = weights.ranks_cpu[:2]  # incomplete mirror: unknown
    assert weights.active_slice_ranks((0,)) is None


def test_active_slots_given_by_the_caller_are_checked() -> None:
    assert _active_slot_set([], 4, [3, 1, 1]) == (1, 3)  # device slots: the caller's set
    assert _active_slot_set([], 4, None) is None
    assert _active_slot_set([2, -1, 0], 4, None) == (0, 2)
    assert _active_slot_set([2, -1, 0], 4, [0, 1, 2]) == (0, 2)  # host slots: exact
    with pytest.raises(ValoraError, match="miss slots"):
        _active_slot_set([2, -1, 0], 4, [0])
    with pytest.raises(ValoraError, match="out of range"):
        _active_slot_set([], 4, [4])
    batch = prepare_lora_batch(torch.tensor([1, 1, -1], dtype=torch.int32), 3, "triton",
                               active_slots=[1, 2])
    assert batch.active_slots == (1,) and batch.num_active_slots == 1
