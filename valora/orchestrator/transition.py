"""Carry out a policy's decision on the weights: the one place the engine changes modes.

``apply_decision`` merges, unmerges or switches through a :class:`WeightSwitcher` only when the
decision changes the merged adapter (``MERGED(m)`` ↔ ``MIXED(m)`` is free) and returns the new
:class:`ModeState`. The engine then builds the step's slot lists with ``plan_lora_batches``.
"""

from __future__ import annotations

from collections.abc import Callable

from valora.errors import ValoraError
from valora.orchestrator.merge import SwitchReport, WeightSwitcher
from valora.orchestrator.modes import ModeState
from valora.orchestrator.queue_view import ModeDecision


def apply_decision(
    switcher: WeightSwitcher,
    state: ModeState,
    decision: ModeDecision,
    slot_of: Callable[[str], int],
    now: float,
) -> tuple[ModeState, SwitchReport]:
    """Bring the weights to ``decision``'s merged adapter; ``slot_of`` maps an adapter name to its
    resident (pinned) LoRA slot. ``since`` moves to ``now`` only when the weights change."""
    if switcher.merged_adapter != (state.merged_adapter if state.mode.has_merged_adapter else None):
        raise ValoraError(f"mode state {state} disagrees with the weights "
                          f"(merged: {switcher.merged_adapter!r})")
    target = decision.merged_adapter if decision.mode.has_merged_adapter else None
    if state.same_weights(decision.mode, target):
        slot = state.merged_slot if target is not None else None
        return ModeState(decision.mode, target, slot, state.since), SwitchReport(0, 0)
    if target is None:
        return ModeState(decision.mode, None, None, now), switcher.unmerge()
    slot = slot_of(target)
    return ModeState(decision.mode, target, slot, now), switcher.switch(slot, target)
