"""The Triton LoRA backend against the pure-PyTorch twin (CPU: Triton interpreter).

Grid: dtypes × popularity, slice layouts (GQA qkv, gate_up, one slice, five slices → two expand
launches), mixed ranks incl. 1 and non-powers of two and rank-0 slices, rows without adapter,
empty batches, scale_multiplier -1, split-K and many tiles per slot.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error, triton_output

from valora.ops.lora import LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import POPULARITIES, make_slot_weights, make_token_slots
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig
from valora.ops.triton_lora import lora_apply_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLICES = {"qkv_gqa": (24, 8, 8), "single": (40,), "gate_up": (20, 20), "five": (8, 16, 8, 8, 24)}
MIXED = (1, 3, 8, 5, 16, 2, 7)


def mixed_ranks(num_slots: int, num_slices: int) -> list[list[int]]:
    ranks = [[MIXED[(s + 2 * j) % len(MIXED)] for j in range(num_slices)] for s in range(num_slots)]
    if num_slices > 1 and num_slots > 3:
        ranks[3][1] = 0  # an adapter that does not target slice 1
    return ranks


def make_case(num_tokens: int, slices: tuple[int, ...], ranks: list[list[int]] | list[int],
              dtype: torch.dtype, popularity: str = "uniform", none_fraction: float = 0.2,
              in_features: int = 48, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weights = make_slot_weights(ranks, in_features, slices, dtype, DEVICE, seed)
    slots = make_token_slots(num_tokens, len(ranks), popularity, generator, none_fraction)
    x = torch.randn(num_tokens, in_features, generator=generator).to(DEVICE, dtype)
    # y small next to the LoRA term, so the error measure is dominated by the kernels' work.
    y = (0.1 * torch.randn(num_tokens, sum(slices), generator=generator)).to(DEVICE, dtype)
    return weights, slots, x, y


def check(weights: LoRASlotWeights, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          multiplier: float = 1.0) -> torch.Tensor:
    num_slots = weights.num_slots
    out = triton_output(y, x, weights, slots, num_slots, multiplier)
    ref = reference_output(y, x, weights, slots, num_slots, multiplier)
    assert relative_error(out, ref) <= TOLERANCE[x.dtype]
    untouched = (slots < 0).to(out.device)
    assert torch.equal(out[untouched], y[untouched]), "rows without adapter changed"
    return out


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_dtype_popularity(dtype: torch.dtype, popularity: str) -> None:
    ranks = mixed_ranks(7, 3)
    weights, slots, x, y = make_case(37, SLICES["qkv_gqa"], ranks, dtype, popularity)
    check(weights, slots, x, y, multiplier=-1.0 if popularity == "zipf" else 1.0)


@pytest.mark.parametrize("layout", sorted(SLICES))
@pytest.mark.parametrize("rank_kind", ["uniform", "mixed"])
def test_slice_layouts(layout: str, rank_kind: str) -> None:
    slices = SLICES[layout]
    ranks = [[8] * len(slices)] * 5 if rank_kind == "uniform" else mixed_ranks(5, len(slices))
    weights, slots, x, y = make_case(29, slices, ranks, torch.bfloat16, "uniform", seed=3)
    check(weights, slots, x, y)


def test_scale_multiplier_minus_one_undoes_plus_one() -> None:
    weights, slots, x, y = make_case(19, SLICES["gate_up"], mixed_ranks(4, 2), torch.float32)
    out = check(weights, slots, x, y, multiplier=1.0)
    batch = prepare_lora_batch(slots.to(DEVICE), weights.num_slots, "triton")
    lora_apply(out, x, weights, batch, scale_multiplier=-1.0)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-5)


def test_empty_batch_is_a_no_op() -> None:
    weights, _, _, _ = make_case(4, SLICES["single"], [4, 2], torch.float16)
    x = torch.empty(0, 48, dtype=torch.float16, device=DEVICE)
    y = torch.empty(0, 40, dtype=torch.float16, device=DEVICE)
    batch = prepare_lora_batch(torch.empty(0, dtype=torch.int32, device=DEVICE), 2, "triton")
    lora_apply(y, x, weights, batch)
    assert y.shape == (0, 40)


def test_rows_without_adapter_only() -> None:
    weights, _, x, y = make_case(11, SLICES["qkv_gqa"], [4, 2, 8], torch.bfloat16)
    slots = torch.full((11,), -1, dtype=torch.int32)
    out = triton_output(y, x, weights, slots, weights.num_slots)
    assert torch.equal(out, y)


def test_single_token_rank_one() -> None:
    weights, _, x, y = make_case(1, SLICES["gate_up"], [[1, 1], [3, 1]], torch.float32)
    check(weights, torch.tensor([1], dtype=torch.int32), x, y)


@pytest.mark.parametrize(("in_features", "split_k"), [(80, 3), (64, 2)])
def test_split_k_and_many_tiles_per_slot(in_features: int, split_k: int) -> None:
    """50 tokens of one hot slot with block_m 16: four tiles of one slot; K split (even and not)."""
    weights, slots, x, y = make_case(50, SLICES["qkv_gqa"], mixed_ranks(3, 3), torch.float32,
                                     "one_hot", none_fraction=0.1, in_features=in_features)
    config = TileConfig(ShrinkConfig(16, 16, 16, split_k, 4, 2), ExpandConfig(16, 16, 16, 4, 2))
    out = y.clone()
    batch = prepare_lora_batch(slots.to(DEVICE), weights.num_slots, "triton")
    lora_apply_triton(out, x, weights, batch, 1.0, config=config)
    ref = reference_output(y, x, weights, slots, weights.num_slots)
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]


def test_uniform_rank_equal_to_storage() -> None:
    weights, slots, x, y = make_case(23, SLICES["single"], [16] * 6, torch.float16, "distinct")
    check(weights, slots, x, y)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_deferred_metadata_is_built_on_first_use(backend: str) -> None:
    """``defer=True`` leaves the backend data to the first ``lora_apply``; results are identical."""
    weights = make_slot_weights(mixed_ranks(6, 2), 32, SLICES["gate_up"], torch.float32, DEVICE, 0)
    slots = make_token_slots(20, 6, "zipf", torch.Generator().manual_seed(1), 0.2).to(DEVICE)
    x = torch.randn(20, 32, device=DEVICE)
    eager_batch = prepare_lora_batch(slots, 6, backend)
    deferred = prepare_lora_batch(slots, 6, backend, defer=True)
    assert deferred.backend_data is None
    y_eager, y_deferred = torch.zeros(20, 40, device=DEVICE), torch.zeros(20, 40, device=DEVICE)
    lora_apply(y_eager, x, weights, eager_batch)
    lora_apply(y_deferred, x, weights, deferred)
    assert deferred.backend_data is not None
    assert torch.equal(y_eager, y_deferred)
