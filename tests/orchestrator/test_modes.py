"""Mode state and the per-token slot lists each mode produces."""

from __future__ import annotations

import pytest

from valora.errors import ValoraError
from valora.orchestrator.modes import Mode, ModeState, plan_lora_batches


def test_unmerged_passes_slots_through() -> None:
    slots = [0, 2, -1, 2, 1]
    lora, correction = plan_lora_batches(slots, None)
    assert lora == slots and lora is not slots
    assert correction is None


def test_mixed_rows_of_other_adapters_and_base_get_correction() -> None:
    lora, correction = plan_lora_batches([2, 0, -1, 2, 1, 0], 2)
    assert lora == [-1, 0, -1, -1, 1, 0]
    assert correction == [-1, 2, 2, -1, 2, 2]


def test_mixed_with_only_merged_rows_needs_no_correction_launch() -> None:
    lora, correction = plan_lora_batches([3, 3, 3], 3)
    assert lora == [-1, -1, -1]
    assert correction is None


def test_merged_mode_rejects_other_rows() -> None:
    assert plan_lora_batches([1, 1], 1, mode=Mode.MERGED) == ([-1, -1], None)
    with pytest.raises(ValoraError, match="mixed mode"):
        plan_lora_batches([1, 0, 1], 1, mode=Mode.MERGED)
    with pytest.raises(ValoraError):
        plan_lora_batches([1, -1], 1, mode=Mode.MERGED)


def test_mode_and_slot_must_agree() -> None:
    with pytest.raises(ValoraError):
        plan_lora_batches([0], 1, mode=Mode.UNMERGED)
    with pytest.raises(ValoraError):
        plan_lora_batches([0], None, mode=Mode.MIXED)


def test_mode_state_validation_and_free_transitions() -> None:
    with pytest.raises(ValoraError):
        ModeState(Mode.MERGED)
    with pytest.raises(ValoraError):
        ModeState(Mode.UNMERGED, merged_adapter="a")
    merged = ModeState(Mode.MERGED, "a", 3)
    assert merged.same_weights(Mode.MIXED, "a")
    assert not merged.same_weights(Mode.MIXED, "b")
    assert not merged.same_weights(Mode.UNMERGED, None)
    assert ModeState().same_weights(Mode.UNMERGED, "ignored")
