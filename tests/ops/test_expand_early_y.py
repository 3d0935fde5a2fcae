"""The expand's ``EARLY_Y`` tile choice (``ExpandConfig.early_y``: the ``y`` tile loaded before
the rank loop) gives the same result as the late load, against the fp32 reference: dtypes,
several slices, mixed ranks with rank tails, rows without adapter, a mixed-mode batch carrying the
correction; and the flag survives the table's JSON (and is left out of it when false)."""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error

from valora.ops import triton_lora
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_variants import LoRALayerShape, kernel_variants
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiles(early_y: bool) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, 16, 2, 4, 2), ExpandConfig(16, 32, 16, 4, 2, early_y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_early_y_matches_the_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    ranks = [1, 5, 16, 13]
    slices = (40, 24)
    weights = make_slot_weights(ranks, 48, slices, dtype, DEVICE, seed=5, max_rank=16)
    slots = torch.tensor([0, 1, -1, 2, 3, 3, 3, -1, 1, 2], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(len(slots), 48, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(len(slots), sum(slices), generator=generator)).to(DEVICE, dtype)
    ref = reference_output(y, x, weights, slots.cpu(), len(ranks))
    outs = []
    for early_y in (False, True):
        monkeypatch.setattr(triton_lora, "select_tile_config",
                            lambda *args, e=early_y, **kwargs: (_tiles(e), "test"))
        out = y.clone()
        lora_apply(out, x, weights, prepare_lora_batch(slots, len(ranks), "triton"))
        assert relative_error(out.cpu(), ref) <= TOLERANCE[dtype]
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_early_y_with_the_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed mode in one op: rows of other adapters gain their term minus the merged slot's;
    base rows only lose the merged term; both tile choices agree bit for bit."""
    weights = make_slot_weights([8, 3, 16], 48, (24, 8, 8), torch.float32, DEVICE, seed=1,
                                max_rank=16)
    own = torch.tensor([0, -1, 1, 1, 0, -1], dtype=torch.int32)
    corr = torch.full_like(own, 2)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(len(own), 48, generator=generator).to(DEVICE)
    y = torch.randn(len(own), 40, generator=generator).to(DEVICE)
    outs = []
    for early_y in (False, True):
        monkeypatch.setattr(triton_lora, "select_tile_config",
                            lambda *args, e=early_y, **kwargs: (_tiles(e), "test"))
        out = y.clone()
        batch = prepare_lora_batch(own, 3, "triton", correction_slots=corr)
        if DEVICE != "cpu":
            batch = prepare_lora_batch(own.to(DEVICE), 3, "triton",
                                       correction_slots=corr.to(DEVICE), active_slots=range(3))
        lora_apply(out, x, weights, batch)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    expected = reference_output(y, x, weights, own, 3)
    merged = reference_output(torch.zeros_like(y), x, weights, corr, 3)
    torch.testing.assert_close(outs[1].cpu(), expected - merged, rtol=1e-4, atol=1e-4)


def test_early_y_round_trips_the_table_json() -> None:
    late, early = _tiles(False), _tiles(True)
    assert "early_y" not in late.to_json()["expand"]
    assert early.to_json()["expand"]["early_y"] == 1
    assert TileConfig.from_json(early.to_json()) == early
    assert TileConfig.from_json(late.to_json()) == late


def test_early_y_is_its_own_binary() -> None:
    weights = make_slot_weights([8], 48, (40, 24), torch.bfloat16, "cpu", seed=0, max_rank=16)
    shape = LoRALayerShape.of(weights)
    assert kernel_variants(shape, _tiles(False), 8)[1] != kernel_variants(shape, _tiles(True), 8)[1]
