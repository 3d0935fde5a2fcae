"""Inference modes and the per-token LoRA slot lists each mode hands to the batched LoRA op.

Three modes (see ``docs/modes.md``):

- ``UNMERGED``: base weights ``W``; every row adds its own adapter's delta through ``lora``.
- ``MERGED``: weights hold ``W_m = W + s_m·B_m·A_m``; only rows of ``m`` run; no LoRA op at all.
- ``MIXED``: weights hold ``W_m``; rows of ``m`` run as in merged mode, rows of another adapter
  ``i`` add their own delta (``lora``, slot of ``i``) *and* subtract ``m``'s (``lora_correction``,
  slot of ``m``, applied with ``scale_multiplier=-1``); base-model rows only subtract ``m``'s.

Invariant (modes are optimisations, never semantics): for every row ``t`` with adapter slot
``s_t`` (``-1`` = base model), ``x_t·W_mᵀ + lora(s_t) − lora(m)·[s_t ≠ m]`` equals
``x_t·Wᵀ + lora(s_t)`` up to rounding. The merged adapter's slot must stay resident (pinned) while
merged, because the correction reads its factors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from valora.errors import ValoraError


class Mode(enum.Enum):
    """How the base weights and the batched LoRA op share the work of one step."""

    UNMERGED = "unmerged"
    MERGED = "merged"
    MIXED = "mixed"

    @property
    def has_merged_adapter(self) -> bool:
        """True when the weights hold some adapter folded in (``MERGED`` or ``MIXED``)."""
        return self is not Mode.UNMERGED


@dataclass(frozen=True)
class ModeState:
    """The orchestrator's current mode.

    ``merged_adapter`` / ``merged_slot`` name the adapter folded into the weights; both are
    ``None`` exactly when ``mode`` is ``UNMERGED``. ``merged_slot`` may be ``None`` where slots are
    not known (policies and the simulator work with names). ``since`` is the time (seconds, the
    caller's clock) the weights last changed; policies use it for hysteresis.
    """

    mode: Mode = Mode.UNMERGED
    merged_adapter: str | None = None
    merged_slot: int | None = None
    since: float = 0.0

    def __post_init__(self) -> None:
        if self.mode.has_merged_adapter and self.merged_adapter is None:
            raise ValoraError(f"mode {self.mode.value} needs a merged adapter")
        if not self.mode.has_merged_adapter and (
                self.merged_adapter is not None or self.merged_slot is not None):
            raise ValoraError("unmerged mode cannot name a merged adapter or slot")

    def same_weights(self, mode: Mode, merged_adapter: str | None) -> bool:
        """True when moving to ``(mode, merged_adapter)`` needs no merge or unmerge.

        ``MERGED(m)`` and ``MIXED(m)`` share the weights ``W_m``: moving between them is free.
        """
        current = self.merged_adapter if self.mode.has_merged_adapter else None
        target = merged_adapter if mode.has_merged_adapter else None
        return current == target


def plan_lora_batches(
    token_slots: list[int],
    merged_slot: int | None,
    *,
    mode: Mode | None = None,
) -> tuple[list[int], list[int] | None]:
    """Per-token slot lists for ``ForwardBatch.lora`` and ``ForwardBatch.lora_correction``.

    ``token_slots[t]`` is token ``t``'s adapter slot (``-1`` = base model). ``merged_slot`` is the
    slot of the adapter folded into the weights (``None`` = unmerged). ``mode`` defaults to
    ``UNMERGED`` when ``merged_slot`` is ``None`` and ``MIXED`` otherwise; passing ``MERGED``
    asserts that every token belongs to the merged adapter.

    Returns ``(lora_slots, correction_slots)``:

    - unmerged: ``lora_slots == token_slots``, ``correction_slots is None``;
    - merged / mixed: tokens of the merged adapter get ``-1`` in both lists; other adapter tokens
      keep their slot in ``lora_slots`` and get ``merged_slot`` as correction; base tokens get
      ``-1`` and ``merged_slot`` as correction. ``correction_slots`` is ``None`` when no token needs
      a correction (all tokens are the merged adapter's), so the caller skips that launch.
    """
    if mode is None:
        mode = Mode.UNMERGED if merged_slot is None else Mode.MIXED
    if mode is Mode.UNMERGED:
        if merged_slot is not None:
            raise ValoraError(f"unmerged mode cannot have merged slot {merged_slot}")
        return list(token_slots), None
    if merged_slot is None or merged_slot < 0:
        raise ValoraError(f"mode {mode.value} needs a merged slot >= 0, got {merged_slot}")
    if mode is Mode.MERGED:
        strangers = sorted({slot for slot in token_slots if slot != merged_slot})
        if strangers:
            raise ValoraError(f"merged mode on slot {merged_slot} got tokens of slots {strangers}; "
                              "use mixed mode to run other adapters' rows")
        return [-1] * len(token_slots), None
    lora_slots = [-1 if slot == merged_slot else slot for slot in token_slots]
    correction = [-1 if slot == merged_slot else merged_slot for slot in token_slots]
    if all(slot < 0 for slot in correction):
        return lora_slots, None
    return lora_slots, correction
