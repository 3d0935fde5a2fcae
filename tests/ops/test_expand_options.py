"""The expand's tile options — ``ExpandConfig.early_y`` (the ``y`` tile loaded before the rank
loop) and ``ExpandConfig.col_loop`` (several column blocks per program, slices partitioned in
spans of ``block_n · col_loop``, a span's last blocks past the slice skipped) — give the same
result as the plain expand, bit for bit, and match the fp32 reference: dtypes, several slices of
widths that are and are not multiples of the span, mixed ranks with rank tails, rows without
adapter, a mixed-mode batch carrying the correction; the options survive the table's JSON (and
are left out of it at their defaults) and name their own binaries."""

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


OPTIONS = [(False, 1), (True, 1), (False, 2), (True, 3), (False, 4)]


def _tiles(early_y: bool, col_loop: int = 1) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, 16, 2, 4, 2),
                      ExpandConfig(16, 32, 16, 4, 2, early_y, col_loop))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_options_match_the_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    ranks = [1, 5, 16, 13]
    slices = (40, 24, 96)  # 2, 1 and 3 blocks of 32: spans of 2-4 blocks cut each slice short
    weights = make_slot_weights(ranks, 48, slices, dtype, DEVICE, seed=5, max_rank=16)
    slots = torch.tensor([0, 1, -1, 2, 3, 3, 3, -1, 1, 2], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(len(slots), 48, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(len(slots), sum(slices), generator=generator)).to(DEVICE, dtype)
    ref = reference_output(y, x, weights, slots.cpu(), len(ranks))
    outs = []
    for early_y, col_loop in OPTIONS:
        monkeypatch.setattr(triton_lora, "select_tile_config",
                            lambda *args, e=early_y, c=col_loop, **kwargs: (_tiles(e, c), "test"))
        out = y.clone()
        lora_apply(out, x, weights, prepare_lora_batch(slots, len(ranks), "triton"))
        assert relative_error(out.cpu(), ref) <= TOLERANCE[dtype]
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_options_with_the_correction(monkeypatch: pytest.MonkeyPatch) -> None:
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
    for early_y, col_loop in OPTIONS:
        monkeypatch.setattr(triton_lora, "select_tile_config",
                            lambda *args, e=early_y, c=col_loop, **kwargs: (_tiles(e, c), "test"))
        out = y.clone()
        batch = prepare_lora_batch(own, 3, "triton", correction_slots=corr)
        if DEVICE != "cpu":
            batch = prepare_lora_batch(own.to(DEVICE), 3, "triton",
                                       correction_slots=corr.to(DEVICE), active_slots=range(3))
        lora_apply(out, x, weights, batch)
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    expected = reference_output(y, x, weights, own, 3)
    merged = reference_output(torch.zeros_like(y), x, weights, corr, 3)
    torch.testing.assert_close(outs[1].cpu(), expected - merged, rtol=1e-4, atol=1e-4)


def test_options_round_trip_the_table_json() -> None:
    plain = _tiles(False)
    assert set(plain.to_json()["expand"]) == {"block_m", "block_n", "block_k", "num_warps",
                                              "num_stages"}
    for early_y, col_loop in OPTIONS:
        tiles = _tiles(early_y, col_loop)
        assert TileConfig.from_json(tiles.to_json()) == tiles
    assert _tiles(True, 3).to_json()["expand"]["col_loop"] == 3


def test_options_are_their_own_binaries() -> None:
    weights = make_slot_weights([8], 48, (40, 24), torch.bfloat16, "cpu", seed=0, max_rank=16)
    shape = LoRALayerShape.of(weights)
    binaries = {kernel_variants(shape, _tiles(e, c), 8)[1] for e, c in OPTIONS}
    assert len(binaries) == len(OPTIONS)
