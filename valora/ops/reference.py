"""Pure-PyTorch twins of valora's ops. Exact semantics, no padding of ranks, no speed claims."""

from __future__ import annotations

import torch

from valora.ops.lora import LoRABatch, LoRASlotWeights


def prepare_lora_reference(batch: LoRABatch) -> dict[int, torch.Tensor]:
    """Group token indices by slot: ``{slot: token_indices}`` (rows without adapter dropped)."""
    slots = batch.token_slots.to("cpu", torch.int64)
    groups: dict[int, torch.Tensor] = {}
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            rows = torch.nonzero(slots == slot, as_tuple=False).flatten()
            groups[int(slot)] = rows.to(batch.token_slots.device)
    return groups


def lora_apply_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: LoRASlotWeights,
    batch: LoRABatch,
    scale_multiplier: float = 1.0,
) -> None:
    """Per-slot loop: gather the slot's tokens, shrink with its true rank, expand, scatter-add."""
    groups: dict[int, torch.Tensor] = batch.backend_data  # type: ignore[assignment]
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
