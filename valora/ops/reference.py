"""Pure-PyTorch twins of valora's ops. Exact semantics, no padding of ranks, no speed claims."""

from __future__ import annotations

import torch

from valora.ops.lora import LoRABatch, LoRASlotWeights


def _groups(token_slots: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{slot: token_indices}`` (rows without adapter dropped)."""
    slots = token_slots.to("cpu", torch.int64)
    groups: dict[int, torch.Tensor] = {}
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            rows = torch.nonzero(slots == slot, as_tuple=False).flatten()
            groups[int(slot)] = rows.to(token_slots.device)
    return groups


def prepare_lora_reference(batch: LoRABatch
                           ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Token indices by slot for the tokens' own adapters and for the correction (empty
    without one)."""
    correction = batch.correction_slots
    return _groups(batch.token_slots), (_groups(correction) if correction is not None else {})


def lora_apply_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: LoRASlotWeights,
    batch: LoRABatch,
    scale_multiplier: float = 1.0,
) -> None:
    """Per-slot loop: gather the slot's tokens, shrink with its true rank, expand, scatter-add;
    then the same for the correction with the multiplier negated."""
    own: dict[int, torch.Tensor]
    correction: dict[int, torch.Tensor]
    own, correction = batch.backend_data  # type: ignore[misc]
    _apply_groups(y, x, weights, own, scale_multiplier)
    _apply_groups(y, x, weights, correction, -scale_multiplier)


def _apply_groups(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
                  groups: dict[int, torch.Tensor], scale_multiplier: float) -> None:
    if not groups:
        return
    ranks = weights.host_ranks()
    scales = weights.scales.tolist()
    for slot, rows in groups.items():
        xs = x.index_select(0, rows).float()
        offset = 0
        for j, width in enumerate(weights.slice_widths):
            rank = int(ranks[slot][j])
            if rank > 0:
                a = weights.lora_a[slot, j, :rank].float()
                b = weights.lora_b[slot, offset:offset + width, :rank].float()
                delta = (xs @ a.t()) @ b.t() * (scales[slot][j] * scale_multiplier)
                y[:, offset:offset + width].index_add_(0, rows, delta.to(y.dtype))
            offset += width
