"""Bad input to the Triton LoRA launcher: a clear ValoraError or a correct fallback, never a
silently wrong result."""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error, triton_output

from valora.errors import ValoraError
from valora.ops.lora import LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import MAX_TABLE_RANK
from valora.ops.tile_table import select_tile_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTHS = (16, 8)


def problem(dtype: torch.dtype = torch.float32, num_tokens: int = 9, ranks=(4, 2, 3)):
    generator = torch.Generator().manual_seed(5)
    weights = make_slot_weights(list(ranks), 32, WIDTHS, dtype, DEVICE, 5)
    slots = make_token_slots(num_tokens, len(ranks), "uniform", generator, 0.2)
    x = torch.randn(num_tokens, 32, generator=generator).to(DEVICE, dtype)
    y = torch.randn(num_tokens, sum(WIDTHS), generator=generator).to(DEVICE, dtype)
    return weights, slots, x, y


def batch_for(slots: torch.Tensor, num_slots: int = 3):
    return prepare_lora_batch(slots.to(DEVICE), num_slots, "triton")


def test_mismatched_activation_dtype() -> None:
    weights, slots, x, y = problem(torch.float16)
    with pytest.raises(ValoraError, match="lora_a"):
        lora_apply(y.float(), x.float(), weights, batch_for(slots))


def test_mismatched_output_dtype() -> None:
    weights, slots, x, y = problem(torch.float16)
    with pytest.raises(ValoraError, match="y is"):
        lora_apply(y.float(), x, weights, batch_for(slots))


def test_unsupported_dtype() -> None:
    weights, slots, x, y = problem(torch.float32)
    double = LoRASlotWeights(weights.lora_a.double(), weights.lora_b.double(), weights.ranks,
                             weights.scales, WIDTHS)
    with pytest.raises(ValoraError, match="not supported"):
        lora_apply(y.double(), x.double(), double, batch_for(slots))


def test_mismatched_shapes() -> None:
    weights, slots, x, y = problem()
    with pytest.raises(ValoraError, match="widths"):
        lora_apply(y[:, :-1], x, weights, batch_for(slots))
    with pytest.raises(ValoraError, match="token slots"):
        lora_apply(y[:-1], x[:-1], weights, batch_for(slots))
    bad = LoRASlotWeights(weights.lora_a, weights.lora_b[:, :-1], weights.ranks, weights.scales,
                          WIDTHS)
    with pytest.raises(ValoraError, match="inconsistent"):
        lora_apply(y, x, bad, batch_for(slots))


def test_wrong_rank_and_scale_dtypes() -> None:
    weights, slots, x, y = problem()
    bad = LoRASlotWeights(weights.lora_a, weights.lora_b, weights.ranks.long(), weights.scales,
                          WIDTHS)
    with pytest.raises(ValoraError, match="int32"):
        lora_apply(y, x, bad, batch_for(slots))


def test_non_contiguous_weights_rejected() -> None:
    weights, slots, x, y = problem()
    a = weights.lora_a.transpose(0, 1).contiguous().transpose(0, 1)
    bad = LoRASlotWeights(a, weights.lora_b, weights.ranks, weights.scales, WIDTHS)
    with pytest.raises(ValoraError, match="contiguous"):
        lora_apply(y, x, bad, batch_for(slots))


def test_non_contiguous_activations_are_handled() -> None:
    """A strided x and a transposed-storage y give the twin's result, y updated in place."""
    weights, slots, x, y = problem()
    wide = torch.randn(x.shape[0], 2 * x.shape[1], device=DEVICE)
    x_view = wide[:, ::2]
    y_store = y.t().contiguous()
    y_view = y_store.t()
    assert not x_view.is_contiguous() and not y_view.is_contiguous()
    lora_apply(y_view, x_view, weights, batch_for(slots))
    ref = reference_output(y, x_view, weights, slots, 3)
    assert relative_error(y_store.t(), ref) <= TOLERANCE[torch.float32]


def test_slots_out_of_range_on_cpu() -> None:
    with pytest.raises(ValoraError, match="out of range"):
        prepare_lora_batch(torch.tensor([0, 3], dtype=torch.int32), 3, "triton")
    with pytest.raises(ValoraError, match="out of range"):
        prepare_lora_batch(torch.tensor([-2, 0], dtype=torch.int32), 3, "triton")
    segments = LoRASegments.allocate(2, 3, "cpu")
    with pytest.raises(ValoraError, match="out of range"):
        segments.update(torch.tensor([1, 5], dtype=torch.int32))


def test_weights_with_fewer_slots_than_the_batch() -> None:
    weights, slots, x, y = problem()
    with pytest.raises(ValoraError, match="slots"):
        lora_apply(y, x, weights, prepare_lora_batch(slots.to(DEVICE), 8, "triton"))


def test_batch_from_another_backend() -> None:
    weights, slots, x, y = problem()
    batch = prepare_lora_batch(slots.to(DEVICE), 3, "reference")
    batch.backend = "triton"
    with pytest.raises(ValoraError, match="not prepared"):
        lora_apply(y, x, weights, batch)


def test_rank_above_storage_is_clamped_like_the_twin() -> None:
    weights, slots, x, y = problem()
    weights.ranks[0, 0] = 50
    weights.ranks_cpu[0][0] = 50
    out = triton_output(y, x, weights, slots, 3)
    assert relative_error(out, reference_output(y, x, weights, slots, 3)) <= 1e-5


def test_rank_above_table_coverage_falls_back_to_the_heuristic() -> None:
    rank = MAX_TABLE_RANK + 16
    generator = torch.Generator().manual_seed(1)
    weights = make_slot_weights([rank, 3], 16, (16,), torch.float32, DEVICE, 1)
    slots = make_token_slots(6, 2, "uniform", generator)
    x = torch.randn(6, 16, generator=generator).to(DEVICE)
    y = torch.randn(6, 16, generator=generator).to(DEVICE)
    _, source = select_tile_config(torch.device(DEVICE), 6, rank, 16, (16,), 2)
    assert source == "heuristic"
    out = triton_output(y, x, weights, slots, 2)
    assert relative_error(out, reference_output(y, x, weights, slots, 2)) <= 1e-5
