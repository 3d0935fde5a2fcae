"""The persistent expand (``ExpandConfig.persistent``: a few programs an SM loop over the
(tile, column block) items, ``valora.ops.lora_expand_persistent``) against the fp32 reference and
the one-item kernel with the same tiles: dtypes, one to three slices, mixed ranks with rank 1 and
rank tails over a larger storage rank, rows without adapter, split-K planes summed unrolled and in
a run-time loop, grids of fewer programs than items, a scale multiplier; batches it does not
serve (the mixed-mode correction, the column layout of ``B``) fall back to the one-item kernel;
the choice survives the table's JSON, is its own binary and is offered only to large buckets."""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error

from valora.ops import lora_expand_persistent, triton_lora
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_variants import LoRALayerShape, kernel_variants
from valora.ops.tile_candidates import PERSISTENT_MIN_TOKENS, expand_candidates
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS = [0, 1, -1, 2, 3, 3, 3, -1, 1, 2, 0, 0, 3, 2, 2, 1, 3, 3, -1, 0]


def _tiles(persistent: int, split_k: int = 2, stages: int = 2, block_k: int = 16) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, 16, split_k, 4, 2),
                      ExpandConfig(16, 32, block_k, 4, stages, persistent=persistent))


def _run(monkeypatch: pytest.MonkeyPatch, tiles: TileConfig, weights, slots: torch.Tensor,
         x: torch.Tensor, y: torch.Tensor, multiplier: float = 1.0, **batch_kwargs) -> torch.Tensor:
    monkeypatch.setattr(triton_lora, "select_tile_config", lambda *a, **k: (tiles, "test"))
    out = y.clone()
    lora_apply(out, x, weights, prepare_lora_batch(slots, weights.num_slots, "triton",
                                                    **batch_kwargs), multiplier)
    return out


def _problem(dtype: torch.dtype, slices: tuple[int, ...], layout: str = "rank"):
    ranks = [1, 5, 16, 13]
    weights = make_slot_weights(ranks, 48, slices, dtype, DEVICE, seed=5, max_rank=32,
                                b_layout=layout)
    slots = torch.tensor(SLOTS, dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(len(SLOTS), 48, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(len(SLOTS), sum(slices), generator=generator)).to(DEVICE, dtype)
    return weights, slots, x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slices", [(40,), (40, 24), (24, 16, 16)])
@pytest.mark.parametrize(("persistent", "split_k", "stages", "block_k"),
                         [(1, 1, 2, 16), (1, 2, 2, 16), (2, 3, 1, 32), (1, 4, 3, 16)])
def test_persistent_expand_matches_the_reference_and_the_one_item_kernel(
        monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, slices: tuple[int, ...],
        persistent: int, split_k: int, stages: int, block_k: int) -> None:
    weights, slots, x, y = _problem(dtype, slices)
    assert weights.b_rank_major
    calls: list[int] = []
    real = lora_expand_persistent.persistent_programs

    def counted(device: torch.device, cfg: ExpandConfig, items: int) -> int:
        programs = real(device, cfg, items)
        calls.append(items - programs)  # > 0: a program loops over several items
        return programs

    monkeypatch.setattr(lora_expand_persistent, "persistent_programs", counted)
    ref = reference_output(y, x, weights, slots.cpu(), weights.num_slots, 0.75)
    out = _run(monkeypatch, _tiles(persistent, split_k, stages, block_k), weights, slots, x, y,
               0.75)
    assert calls and max(calls) > 0
    assert relative_error(out.cpu(), ref) <= TOLERANCE[dtype]
    one_item = _run(monkeypatch, _tiles(0, split_k, stages, block_k), weights, slots, x, y, 0.75)
    torch.testing.assert_close(out, one_item, rtol=1e-6 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)


def test_correction_and_column_layout_take_the_one_item_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[str] = []
    real = lora_expand_persistent.launch_expand_persistent

    def spy(*args: object, **kwargs: object) -> None:
        launched.append("persistent")
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "launch_expand_persistent", spy)
    weights, slots, x, y = _problem(torch.float32, (24, 16))
    # slot 2 merged: its rows run as merged (no LoRA), every other row subtracts its term
    own = torch.where(slots == 2, -1, slots).to(torch.int32)
    corr = torch.where(slots == 2, -1, 2).to(torch.int32)
    batch_kwargs = ({"correction_slots": corr} if DEVICE == "cpu" else
                    {"correction_slots": corr, "active_slots": range(4), "correction_slot": 2})
    out = _run(monkeypatch, _tiles(1), weights, own, x, y, **batch_kwargs)
    assert launched == []
    expected = reference_output(y, x, weights, own.cpu(), 4)
    merged = reference_output(torch.zeros_like(y), x, weights, corr.cpu(), 4)
    torch.testing.assert_close(out.cpu(), expected - merged, rtol=1e-4, atol=1e-4)

    columns, slots, x, y = _problem(torch.float32, (24, 16), layout="column")
    assert not columns.b_rank_major
    out = _run(monkeypatch, _tiles(1), columns, slots, x, y)
    assert launched == []
    assert relative_error(out.cpu(), reference_output(y, x, columns, slots.cpu(), 4)) <= 1e-5

    _run(monkeypatch, _tiles(1), *_problem(torch.float32, (24, 16)))
    assert launched == ["persistent"]


def test_persistent_round_trips_the_table_json_and_is_its_own_binary() -> None:
    plain, persistent = _tiles(0), _tiles(2)
    assert "persistent" not in plain.to_json()["expand"]
    assert persistent.to_json()["expand"]["persistent"] == 2
    assert TileConfig.from_json(persistent.to_json()) == persistent
    assert TileConfig.from_json(plain.to_json()) == plain
    rank_major = make_slot_weights([8], 48, (40, 24), torch.bfloat16, "cpu", seed=0,
                                   max_rank=32, b_layout="rank")
    shape = LoRALayerShape.of(rank_major)
    one, other = kernel_variants(shape, plain, 8)[1], kernel_variants(shape, persistent, 8)[1]
    assert other.persistent == 2 and one.persistent == 0 and one != other
    # with the correction, or over the column layout, the one-item binary serves it
    assert kernel_variants(shape, persistent, 8, correction=True)[1].persistent == 0
    columns = make_slot_weights([8], 48, (40, 24), torch.bfloat16, "cpu", seed=0, max_rank=32,
                                b_layout="column")
    assert kernel_variants(LoRALayerShape.of(columns), persistent, 8)[1].persistent == 0


def test_the_tuner_offers_it_to_large_buckets_only() -> None:
    def offered(tokens: int) -> list[ExpandConfig]:
        return [c for c in expand_candidates(tokens, 64, 11008, 8, 4096, 2, 132) if c.persistent]

    assert offered(PERSISTENT_MIN_TOKENS) and offered(16384)
    assert not offered(PERSISTENT_MIN_TOKENS // 2) and not offered(32)
