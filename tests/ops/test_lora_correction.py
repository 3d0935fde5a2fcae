"""Mixed mode in one op: ``prepare_lora_batch(..., correction_slots=c)`` adds every token's own
adapter and subtracts the merged adapter's term in one shrink and one expand launch (Triton;
CPU: Triton's interpreter), against the fp32 twin and against the two-op form the engine used
(``lora_apply`` of the rows' own slots, then of the correction with multiplier -1).

Grid: dtypes, slice layouts (GQA qkv, one slice, five slices → two expand launches), mixed
ranks incl. 1 and non-powers of two, a merged adapter with the largest or the smallest rank or
not targeting a slice, rows of the merged adapter (no term), base rows (correction only), a
batch of base rows only, a batch with nothing to correct, host-known and unknown slots (the
CUDA-graph case), and segments rewritten in place for another merged slot. Bad input: two
merged slots, a token with an adapter left uncorrected, out-of-range and misplaced tensors.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, relative_error

from valora.errors import ValoraError
from valora.ops.lora import LoRABatch, LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_segments import LoRASegments
from valora.orchestrator.modes import Mode, plan_lora_batches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLICES = {"qkv_gqa": (24, 8, 8), "single": (40,), "five": (8, 16, 8, 8, 24)}
IN_FEATURES = 48


def _weights(slices: tuple[int, ...], dtype: torch.dtype, ranks: list[list[int]],
             seed: int = 0) -> LoRASlotWeights:
    return make_slot_weights(ranks, IN_FEATURES, slices, dtype, DEVICE, seed, max_rank=16)


def _ranks(num_slices: int) -> list[list[int]]:
    """Six slots: 0 rank 16, 1 rank 1, 2 rank 5, 3 rank 3 (misses slice 1), 4 rank 8, 5 rank 2."""
    ranks = [[r] * num_slices for r in (16, 1, 5, 3, 8, 2)]
    if num_slices > 1:
        ranks[3][1] = 0
    return ranks


def _inputs(num_tokens: int, slices: tuple[int, ...], dtype: torch.dtype, seed: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, IN_FEATURES, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(num_tokens, sum(slices), generator=generator)).to(DEVICE, dtype)
    return x, y


def _plan(adapters: list[int], merged: int | None) -> tuple[list[int], list[int] | None]:
    """Per-token (own, correction) slots as the engine plans them (-1 = base row)."""
    return plan_lora_batches(adapters, merged, mode=Mode.MIXED if merged is not None
                             else Mode.UNMERGED)


def _fused(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights, own: list[int],
           correction: list[int] | None, backend: str, host_knows: bool = True) -> torch.Tensor:
    out = y.clone()
    slots = torch.tensor(own, dtype=torch.int32, device=x.device)
    corr = (torch.tensor(correction, dtype=torch.int32, device=x.device)
            if correction is not None else None)
    if host_knows:
        batch = prepare_lora_batch(slots.cpu(), weights.num_slots, backend,
                                   correction_slots=corr.cpu() if corr is not None else None)
        batch = _to_device(batch, x.device, backend)
    else:  # device tensors, nothing known on the host (as a CUDA-graph batch)
        batch = prepare_lora_batch(slots, weights.num_slots, backend, correction_slots=corr,
                                   active_slots=range(weights.num_slots))
    lora_apply(out, x, weights, batch)
    return out


def _to_device(batch: LoRABatch, device: torch.device, backend: str) -> LoRABatch:
    if device.type == "cpu":
        return batch
    corr = batch.correction_slots
    return prepare_lora_batch(batch.token_slots.to(device), batch.num_slots, backend,
                              active_slots=batch.active_slots,
                              correction_slots=corr.to(device) if corr is not None else None,
                              correction_slot=batch.correction_slot)


def _two_ops(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights, own: list[int],
             correction: list[int] | None, backend: str, dtype: torch.dtype) -> torch.Tensor:
    out = y.clone().to(dtype)
    lora_apply(out, x.to(dtype), weights,
               prepare_lora_batch(torch.tensor(own, dtype=torch.int32, device=x.device),
                                  weights.num_slots, backend))
    if correction is not None:
        lora_apply(out, x.to(dtype), weights,
                   prepare_lora_batch(torch.tensor(correction, dtype=torch.int32,
                                                   device=x.device), weights.num_slots, backend),
                   scale_multiplier=-1.0)
    return out


def _fp32(weights: LoRASlotWeights) -> LoRASlotWeights:
    return LoRASlotWeights(weights.lora_a.float(), weights.lora_b.float(), weights.ranks,
                           weights.scales, weights.slice_widths,
                           [list(r) for r in weights.ranks_cpu])


CASES = {
    # adapters per token (-1 = base model), merged slot
    "merged_largest": ([0, 1, 2, 0, -1, 3, 4, 0, 5, 2, -1, 1, 0], 0),
    "merged_smallest": ([1, 2, 1, 4, -1, 3, 1, 5, 0, 0, -1], 1),
    "merged_misses_slice": ([3, 0, 2, -1, 3, 4, 3, 5], 3),
    "base_rows_only": ([-1, -1, -1, -1, -1], 4),
    "merged_rows_only": ([2, 2, 2, 2], 2),
    "many_rows": ([(7 * t) % 6 if t % 5 else -1 for t in range(70)], 5),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("slices", SLICES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_correction_matches_the_twin_and_the_two_op_form(case: str, slices: str,
                                                              dtype: torch.dtype) -> None:
    adapters, merged = CASES[case]
    widths = SLICES[slices]
    weights = _weights(widths, dtype, _ranks(len(widths)))
    x, y = _inputs(len(adapters), widths, dtype)
    own, correction = _plan(adapters, merged)
    ref = _fused(y.float(), x.float(), _fp32(weights), own, correction, "reference")
    two = _two_ops(y.float(), x.float(), _fp32(weights), own, correction, "reference",
                   torch.float32)
    assert torch.allclose(ref, two, rtol=1e-5, atol=1e-5)  # the twin's fused form is exact
    got = _fused(y, x, weights, own, correction, "triton")
    assert relative_error(got, ref) <= TOLERANCE[dtype]
    merged_rows = [t for t, a in enumerate(adapters) if a == merged]
    if merged_rows:  # the merged adapter's own rows carry no LoRA term at all
        assert torch.equal(got[merged_rows], y[merged_rows])


@pytest.mark.parametrize("case", ["merged_largest", "merged_misses_slice", "base_rows_only"])
def test_unknown_slots_give_the_same_result(case: str) -> None:
    """Device tensors without host hints (storage-rank tiles, whole rank axis): same output."""
    adapters, merged = CASES[case]
    widths = SLICES["qkv_gqa"]
    weights = _weights(widths, torch.float32, _ranks(3))
    x, y = _inputs(len(adapters), widths, torch.float32)
    own, correction = _plan(adapters, merged)
    known = _fused(y, x, weights, own, correction, "triton")
    unknown = _fused(y, x, weights, own, correction, "triton", host_knows=False)
    assert relative_error(unknown, known) <= 1e-5


def test_segments_rewritten_for_another_merged_slot() -> None:
    """Graph-style reuse: one allocation, ``update`` with new slots and a new merged slot."""
    widths = SLICES["qkv_gqa"]
    weights = _weights(widths, torch.float32, _ranks(3))
    adapters = [0, 1, 2, -1, 3, 4, 5, 1]
    x, y = _inputs(len(adapters), widths, torch.float32)
    segments = LoRASegments.allocate(len(adapters), weights.num_slots, x.device,
                                     with_correction=True)
    for merged in (1, 4, None, 0):
        own, correction = _plan(adapters, merged)
        slots = torch.tensor(own, dtype=torch.int32, device=x.device)
        corr = (torch.tensor(correction, dtype=torch.int32, device=x.device)
                if correction is not None else None)
        segments.update(slots, correction_slots=corr)
        assert int(segments.correction[0]) == (merged if merged is not None else -1)
        batch = LoRABatch(token_slots=slots, num_slots=weights.num_slots, backend="triton",
                          backend_data=segments, correction_slots=corr)
        out = y.clone()
        lora_apply(out, x, weights, batch)
        ref = _fused(y, x, weights, own, correction, "reference")
        assert relative_error(out, ref) <= 1e-5, merged


def test_correction_tiles_mark_the_correction_only_group() -> None:
    segments = LoRASegments.allocate(6, 3, "cpu", with_correction=True)
    own = torch.tensor([2, -1, 0, -1, -1, 2], dtype=torch.int32)
    corr = torch.tensor([1, 1, 1, -1, 1, 1], dtype=torch.int32)  # token 3: the merged slot's row
    segments.update(own, correction_slots=corr)
    tiles = segments.tile_list(16)
    used = tiles[0][tiles[0] != -1].tolist()
    assert used == [0, 2, -2]  # slot groups in slot order, then the correction-only group
    assert segments.sorted_tokens.tolist()[:5] == [2, 0, 5, 1, 4]
    assert int(segments.correction[0]) == 1 and segments.tile_bound(16) == 1 + 4


@pytest.mark.parametrize(("own", "correction", "message"), [
    ([0, 1, -1], [2, 3, 2], "one merged slot"),
    ([0, 1, -1], [2, -1, 2], "no correction"),
    ([0, 1, -1], [2, 2, 9], "one merged slot"),
])
def test_bad_corrections_are_refused(own: list[int], correction: list[int],
                                     message: str) -> None:
    with pytest.raises(ValoraError, match=message):
        prepare_lora_batch(torch.tensor(own, dtype=torch.int32), 4, "triton",
                           correction_slots=torch.tensor(correction, dtype=torch.int32))


def test_misplaced_or_misshaped_corrections_are_refused() -> None:
    own = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValoraError, match="shape"):
        prepare_lora_batch(own, 4, "triton",
                           correction_slots=torch.tensor([2, 2, 2], dtype=torch.int32))
    with pytest.raises(ValoraError, match="disagrees"):
        prepare_lora_batch(own, 4, "triton", correction_slots=torch.tensor([2, 2]),
                           correction_slot=3)
    with pytest.raises(ValoraError, match="out of range"):
        prepare_lora_batch(own, 4, "triton", correction_slots=torch.tensor([2, 2]),
                           correction_slot=7)
    segments = LoRASegments.allocate(2, 4, "cpu")
    with pytest.raises(ValoraError, match="without correction"):
        segments.update(own, correction_slots=torch.tensor([2, 2], dtype=torch.int32))
