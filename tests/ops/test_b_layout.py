"""``lora_b`` stored rank-major (``valora.ops.lora``, ``VALORA_LORA_B_LAYOUT``): same values, same
results.

The layout switch and its allocation are host code; the Triton expand reads a rank-major ``B``
through its ``B_RANK_MAJOR`` constexpr and must give the bits of the contiguous layout (the same
loads of the same values, in the same order of sums) for slices of several widths, ranks below,
at and above a rank chunk, storage ranks that are and are not multiples of the chunk, split-K
planes, early ``y``, the mixed-mode correction, programmatic-dependent-launch level 2 and host-known
(effective-rank) as well as unknown slots. Runs in the interpreter on the CPU and for real on a
GPU.
"""

from __future__ import annotations

import pytest
import torch

from valora.errors import ValoraError
from valora.ops.lora import (
    LoRASlotWeights,
    b_storage,
    lora_apply,
    lora_b_layout,
    prepare_lora_batch,
)
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.lora_variants import LoRALayerShape
from valora.ops.pdl import pdl_supported
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig
from valora.ops.triton_lora import launch_expand, launch_shrink, lora_apply_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RANKS = [1, 8, 13, 16, 17, 40]


def test_layout_switch_and_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VALORA_LORA_B_LAYOUT", raising=False)
    assert lora_b_layout() == "rank"
    weights = LoRASlotWeights.empty(2, 8, 16, (24, 8), torch.float32, "cpu")
    monkeypatch.setenv("VALORA_LORA_B_LAYOUT", "column")
    column = LoRASlotWeights.empty(2, 8, 16, (24, 8), torch.float32, "cpu")
    assert not column.b_rank_major and column.lora_b.is_contiguous()
    assert weights.b_rank_major and weights.lora_b.shape == (2, 32, 8)
    assert weights.lora_b.stride() == (8 * 32, 1, 32)
    assert not weights.lora_b.any()
    monkeypatch.setenv("VALORA_LORA_B_LAYOUT", "rows")
    with pytest.raises(ValoraError, match="VALORA_LORA_B_LAYOUT='rows'"):
        lora_b_layout()
    with pytest.raises(ValoraError, match="layout"):
        LoRASlotWeights.empty(2, 8, 16, (24,), torch.float32, "cpu", b_layout="rows")


def test_storage_keeps_values_and_views_write_through() -> None:
    b = torch.randn(3, 20, 8)
    rank_major = b_storage(b, "rank")
    assert torch.equal(rank_major, b) and rank_major.transpose(1, 2).is_contiguous()
    assert b_storage(rank_major, "column").is_contiguous()
    rank_major[1, 4:9, :3] = 7.0  # what the slot writer does, through the view
    assert bool((rank_major.transpose(1, 2).contiguous()[1, :3, 4:9] == 7.0).all())


def test_rank_major_binaries_are_their_own_variants() -> None:
    column = make_slot_weights([8, 16], 32, (32, 16), torch.float32, "cpu", 0, b_layout="column")
    rank = make_slot_weights([8, 16], 32, (32, 16), torch.float32, "cpu", 0, b_layout="rank")
    assert LoRALayerShape.of(column).shrink_spec() == LoRALayerShape.of(rank).shrink_spec()
    assert LoRALayerShape.of(column).expand_spec() != LoRALayerShape.of(rank).expand_spec()


def _batch(slots: torch.Tensor, num_slots: int, corr: torch.Tensor | None, known: bool):
    host = prepare_lora_batch(slots, num_slots, "triton", correction_slots=corr)
    if DEVICE.type == "cpu" and known:
        return host
    return prepare_lora_batch(
        slots.to(DEVICE), num_slots, "triton",
        active_slots=host.active_slots if known else range(num_slots),
        correction_slots=corr.to(DEVICE) if corr is not None else None,
        correction_slot=host.correction_slot)


@pytest.mark.parametrize(("widths", "storage", "block_k", "split_k", "early_y", "correction",
                          "known"), [
    ((48,), 40, 16, 1, False, False, True),
    ((32, 8, 8), 40, 16, 2, True, False, True),
    ((24, 24), 48, 32, 1, False, True, True),
    ((32, 8, 8), 64, 64, 2, False, True, False),
    ((40,), 17, 16, 1, False, False, False),
])
def test_rank_major_b_gives_the_bits_of_column_major(
        widths: tuple[int, ...], storage: int, block_k: int, split_k: int, early_y: bool,
        correction: bool, known: bool) -> None:
    ranks = [min(r, storage) for r in RANKS]
    num_slots, in_features, tokens = len(ranks), 32, 24
    column, rank = (make_slot_weights(ranks, in_features, widths, torch.float32, DEVICE, 3,
                                      max_rank=storage, b_layout=layout)
                    for layout in ("column", "rank"))
    assert rank.b_rank_major and torch.equal(column.lora_b, rank.lora_b)
    generator = torch.Generator().manual_seed(storage)
    slots = make_token_slots(tokens, num_slots, "zipf", generator, 0.2)
    corr = None
    if correction:  # slot 3 merged: its rows carry no term, every other row is corrected
        corr = torch.where(slots == 3, -1, 3).to(torch.int32)
        slots = torch.where(slots == 3, -1, slots).to(torch.int32)
    batch = _batch(slots, num_slots, corr, known)
    x = torch.randn(tokens, in_features, generator=generator).to(DEVICE)
    y = torch.randn(tokens, sum(widths), generator=generator).to(DEVICE)
    config = TileConfig(ShrinkConfig(16, 32, 16, split_k, 4, 1),
                        ExpandConfig(16, 32, block_k, 4, 1, early_y))
    outputs = []
    for weights in (column, rank):
        out = y.clone()
        lora_apply_triton(out, x, weights, batch, config=config)
        outputs.append(out)
    assert not torch.equal(outputs[0], y)
    assert torch.equal(outputs[1], outputs[0])
    if DEVICE.type == "cpu" or pdl_supported(DEVICE):  # the prefetched first chunk, too
        segments = batch.backend_data
        assert isinstance(segments, LoRASegments)
        out = y.clone()
        h = launch_shrink(x, rank, segments, config.shrink, pdl=1, pdl_launch=False)
        launch_expand(h, out, rank, segments, config.expand, 1.0, pdl=2)
        assert torch.equal(out, outputs[0])


def test_rank_major_b_through_lora_apply_matches_the_reference() -> None:
    weights = make_slot_weights(RANKS, 32, (32, 8, 8), torch.float32, DEVICE, 5, b_layout="rank")
    generator = torch.Generator().manual_seed(5)
    slots = make_token_slots(20, len(RANKS), "uniform", generator, 0.1)
    x = torch.randn(20, 32, generator=generator).to(DEVICE)
    y = torch.randn(20, 48, generator=generator).to(DEVICE)
    got, want = y.clone(), y.clone()
    lora_apply(got, x, weights, prepare_lora_batch(slots.to(DEVICE), len(RANKS), "triton"))
    lora_apply(want, x, weights, prepare_lora_batch(slots.to(DEVICE), len(RANKS), "reference"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
