"""WeightSwitcher: exact restore, bounded drift, merged weights and mixed-mode algebra."""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, FUSED, NUM_LAYERS, SlotModel, build_slot_model

from valora.errors import ValoraError
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.orchestrator.merge import WeightSwitcher, max_resync_every, resync_drift_bound
from valora.orchestrator.modes import Mode, ModeState, plan_lora_batches
from valora.orchestrator.queue_view import ModeDecision
from valora.orchestrator.transition import apply_decision

ULP_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _snapshot(model: SlotModel) -> dict[tuple[int, str], torch.Tensor]:
    return {key: w.clone() for key, w in model.fused_weights.items()}


def _assert_bitwise(model: SlotModel, snapshot: dict[tuple[int, str], torch.Tensor]) -> None:
    for key, weight in model.fused_weights.items():
        assert torch.equal(weight, snapshot[key]), key


def _delta(model: SlotModel, key: tuple[int, str], slot: int) -> torch.Tensor:
    slots, j = model.slot_map[key]
    rank = slots.ranks_cpu[slot][j]
    offset = sum(slots.slice_widths[:j])
    b = slots.lora_b[slot, offset:offset + slots.slice_widths[j], :rank].double()
    return float(slots.scales[slot, j]) * (b @ slots.lora_a[slot, j, :rank].double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_then_unmerge_is_bit_exact(dtype: torch.dtype) -> None:
    model = build_slot_model(dtype)
    snapshot = _snapshot(model)
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    report = switcher.merge(0, "a0")
    assert report.num_modules == 7 * NUM_LAYERS
    assert not torch.equal(model.fused_weights[(0, "qkv_proj")], snapshot[(0, "qkv_proj")])
    switcher.unmerge()
    _assert_bitwise(model, snapshot)
    assert switcher.merged_adapter is None and switcher.merged_slot is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_equal_w_plus_scaled_ba(dtype: torch.dtype) -> None:
    model = build_slot_model(dtype, seed=1)
    pristine = {key: w.clone() for key, w in model.base_weights.items()}
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    switcher.merge(1, "a1")
    _, targets = ADAPTERS[1]
    for key, weight in model.base_weights.items():
        if key[1] not in targets:
            assert torch.equal(weight, pristine[key]), key
            continue
        expected = (pristine[key].double() + _delta(model, key, 1)).to(dtype)
        torch.testing.assert_close(weight, expected, rtol=ULP_RTOL[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("restore", ["pristine", "resync"])
def test_thousand_cycles_stay_within_documented_bound(dtype: torch.dtype, restore: str) -> None:
    model = build_slot_model(dtype, seed=2)
    snapshot = _snapshot(model)
    pristine = {key: w.clone() for key, w in model.base_weights.items()}
    period = min(16, max_resync_every(dtype))
    switcher = WeightSwitcher(model.base_weights, model.slot_map, restore=restore,  # type: ignore[arg-type]
                              resync_every=period)
    # Every period cycles through all three adapters, so the largest merged |ΔW| is their max.
    keys = sorted(pristine)
    largest = {key: torch.zeros_like(pristine[key], dtype=torch.float64) for key in keys}
    for key in keys:
        for slot, (_, targets) in ADAPTERS.items():
            if key[1] in targets:
                largest[key] = torch.maximum(largest[key], _delta(model, key, slot).abs())
    flat_pristine = torch.cat([pristine[k].double().flatten() for k in keys])
    flat_largest = torch.cat([largest[k].flatten() for k in keys])
    per_unmerge = resync_drift_bound(flat_pristine.to(dtype), flat_largest, 1).double()
    max_since = 0
    for cycle in range(1000):
        slot = cycle % 3
        switcher.merge(slot, f"a{slot}")
        switcher.unmerge()
        since = switcher.unmerges_since_resync
        max_since = max(max_since, since)
        if since == 0:
            _assert_bitwise(model, snapshot)
            continue
        drift = (torch.cat([model.base_weights[k].flatten() for k in keys]).double()
                 - flat_pristine).abs()
        assert bool((drift <= since * per_unmerge).all()), (cycle, float((drift / per_unmerge).max()))
    assert max_since == (0 if restore == "pristine" else period - 1)
    bound = resync_drift_bound(flat_pristine.to(dtype), flat_largest, period - 1)
    torch.testing.assert_close(bound.double(), (period - 1) * per_unmerge)  # linear in k


def test_forward_with_merged_weights_matches_lora_apply() -> None:
    model = build_slot_model(torch.float32, seed=3)
    fused = model.fused_weights[(1, "qkv_proj")]
    slots = model.slot_weights[(1, "qkv_proj")]
    base = fused.clone()
    x = torch.randn(7, fused.shape[1])
    expected = x @ base.t()
    lora_apply(expected, x, slots, prepare_lora_batch(torch.full((7,), 2), slots.num_slots))
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    switcher.merge(2, "a2")
    merged_out = x @ fused.t()
    torch.testing.assert_close(merged_out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged_slot", [0, 1, 2])
def test_mixed_mode_algebra_with_real_lora_op(merged_slot: int) -> None:
    """``x·W_mᵀ + lora(own) − lora(m)`` equals ``x·Wᵀ + lora(own)`` for every row."""
    model = build_slot_model(torch.float32, seed=4)
    gen = torch.Generator().manual_seed(merged_slot)
    token_slots = torch.randint(-1, 3, (40,), generator=gen).tolist()
    bases = {key: w.clone() for key, w in model.fused_weights.items()}
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    switcher.merge(merged_slot, f"a{merged_slot}")
    lora_slots, correction = plan_lora_batches(token_slots, merged_slot)
    assert correction is not None
    for (layer, fused), slots in model.slot_weights.items():
        in_features = FUSED[fused][2]
        x = torch.randn(len(token_slots), in_features, generator=gen)
        reference = x @ bases[(layer, fused)].t()
        lora_apply(reference, x, slots, prepare_lora_batch(torch.tensor(token_slots), slots.num_slots))
        mixed = x @ model.fused_weights[(layer, fused)].t()
        lora_apply(mixed, x, slots, prepare_lora_batch(torch.tensor(lora_slots), slots.num_slots))
        lora_apply(mixed, x, slots, prepare_lora_batch(torch.tensor(correction), slots.num_slots),
                   scale_multiplier=-1.0)
        torch.testing.assert_close(mixed, reference, rtol=1e-5, atol=1e-4)


def test_switch_equals_fresh_merge_and_restores() -> None:
    model = build_slot_model(torch.bfloat16, seed=5)
    snapshot = _snapshot(model)
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    switcher.merge(2, "a2")
    merged_two = _snapshot(model)
    switcher.unmerge()
    switcher.merge(0, "a0")
    report = switcher.switch(2, "a2")
    assert report.num_modules == 12 * NUM_LAYERS  # copy back a0's seven, merge a2's five
    _assert_bitwise(model, merged_two)
    assert switcher.switch(2, "a2").num_modules == 0
    switcher.unmerge()
    _assert_bitwise(model, snapshot)


def test_byte_accounting() -> None:
    model = build_slot_model(torch.bfloat16)
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    module_bytes = {key: w.numel() * w.element_size() for key, w in model.base_weights.items()}
    assert switcher.pristine_bytes == sum(module_bytes.values())
    assert switcher.pristine_device == torch.device("cpu")
    expected = sum(b for (_, name), b in module_bytes.items() if name in ADAPTERS[1][1])
    assert switcher.affected_bytes(1) == expected
    assert switcher.merge(1, "a1").weight_bytes == expected


def test_resync_unmerge_survives_slot_rewrite() -> None:
    model = build_slot_model(torch.float32, seed=6)
    snapshot = _snapshot(model)
    switcher = WeightSwitcher(model.base_weights, model.slot_map, restore="resync", resync_every=4)
    switcher.merge(1, "a1")
    for slots in model.slot_weights.values():
        slots.lora_b[1].normal_()  # the adapter manager reused the slot (a caller bug, but safe)
    switcher.unmerge()
    for key, weight in model.fused_weights.items():
        torch.testing.assert_close(weight, snapshot[key], rtol=1e-6, atol=1e-6)


def test_misuse_raises_typed_errors() -> None:
    model = build_slot_model(torch.float32)
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    with pytest.raises(ValoraError, match="no adapter is merged"):
        switcher.unmerge()
    with pytest.raises(ValoraError, match="targets no module"):
        switcher.merge(3, "empty")
    switcher.merge(0, "a0")
    with pytest.raises(ValoraError, match="unmerge or switch"):
        switcher.merge(1, "a1")
    with pytest.raises(ValoraError, match="out of range"):
        switcher.switch(9, "nine")
    bad = dict(model.base_weights)
    bad[(0, "q_proj")] = bad[(0, "q_proj")][:, :4]
    with pytest.raises(ValoraError, match="LoRA slice needs"):
        WeightSwitcher(bad, model.slot_map)
    with pytest.raises(ValoraError, match="drift-bound limit"):
        WeightSwitcher(build_slot_model(torch.bfloat16).base_weights,
                       build_slot_model(torch.bfloat16).slot_map, restore="resync", resync_every=64)


def test_apply_decision_switches_only_when_the_merged_adapter_changes() -> None:
    model = build_slot_model(torch.float32, seed=7)
    snapshot = _snapshot(model)
    switcher = WeightSwitcher(model.base_weights, model.slot_map)
    slots = {"a0": 0, "a1": 1, "a2": 2}
    state = ModeState()
    state, report = apply_decision(switcher, state, ModeDecision(Mode.MERGED, "a1"), slots.__getitem__, 1.0)
    assert (state.mode, state.merged_adapter, state.merged_slot, state.since) == (
        Mode.MERGED, "a1", 1, 1.0)
    assert report.num_modules == 2 * NUM_LAYERS and switcher.merged_adapter == "a1"
    state, report = apply_decision(switcher, state, ModeDecision(Mode.MIXED, "a1"), slots.__getitem__, 2.0)
    assert (state.mode, state.since, report.num_modules) == (Mode.MIXED, 1.0, 0)
    state, report = apply_decision(switcher, state, ModeDecision(Mode.MIXED, "a2"), slots.__getitem__, 3.0)
    assert switcher.merged_slot == 2 and state.since == 3.0
    state, _ = apply_decision(switcher, state, ModeDecision(Mode.UNMERGED, None), slots.__getitem__, 4.0)
    assert state == ModeState(Mode.UNMERGED, None, None, 4.0)
    _assert_bitwise(model, snapshot)
    with pytest.raises(ValoraError, match="disagrees"):
        apply_decision(switcher, ModeState(Mode.MIXED, "a0", 0), ModeDecision(Mode.UNMERGED, None),
                       slots.__getitem__, 5.0)
