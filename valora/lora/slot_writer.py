"""Writing adapters into the device LoRA slots of every LoRA-aware linear.

The adapter manager decides *which* adapter lives in which slot; this module does the copies.
All device writes of one slot go through one :meth:`SlotPrefetcher.submit` (host copies
page-locked in the slot dtype, copied on a side CUDA stream; synchronous on the CPU), and the
ticket is kept per slot until a step waits on it (``wait``), so a slot can fill while its request
still waits in the queue, without a host synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from valora.engine.memory_plan import PrefetchTicket, SlotPrefetcher
from valora.errors import ValoraError
from valora.logger import get_logger
from valora.lora.adapter import LoRAAdapter, ModuleKey
from valora.lora.shapes import BaseModelShapes
from valora.ops.lora import LoRASlotWeights

logger = get_logger(__name__)

SlotMap = dict[ModuleKey, tuple[LoRASlotWeights, int]]
"""``(layer, PEFT module name) -> (fused linear's slot weights, slice index inside it)``."""


class SlotWriter:
    """Copies adapters into slot ``s`` of every entry of a slot map; not thread-safe (the adapter
    manager calls it under its lock)."""

    def __init__(self, slot_map: SlotMap, base: BaseModelShapes, max_loras: int) -> None:
        self._slot_map = slot_map
        self._groups = _group_by_linear(slot_map)
        self._check_slot_map(base, max_loras)
        self._prefetcher: SlotPrefetcher | None = None
        if self._groups:
            self._prefetcher = SlotPrefetcher(self._groups[0][0].lora_a.device)
        self._tickets: dict[int, PrefetchTicket] = {}
        self._pinned_sources: dict[str, dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]] = {}

    def wait(self, slots: Iterable[int]) -> None:
        """Order the current stream after the pending writes of ``slots`` (others ignored)."""
        for slot in set(slots):
            ticket = self._tickets.get(slot)
            if ticket is None:
                continue
            ticket.wait()
            if ticket.ready():
                del self._tickets[slot]

    def pending(self) -> list[int]:
        """Slots whose last write may still be in flight."""
        return sorted(s for s, t in self._tickets.items() if not t.ready())

    def forget(self, name: str) -> None:
        """Drop the kept host copies of adapter ``name``."""
        self._pinned_sources.pop(name, None)

    def write(self, slot: int, adapter: LoRAAdapter | None, keep_sources: bool = False) -> None:
        """Copy ``adapter`` (or nothing: an empty slot) into ``slot`` of every LoRA linear.

        Targeted slices get A/B rows ``[:r]``, their rank and scale; every other row and every
        untargeted slice is zeroed with rank 0. All device writes are one
        ``SlotPrefetcher.submit`` (side stream on CUDA); its ticket is kept for the slot until a
        step waits on it. ``ranks_cpu`` is updated at once (host bookkeeping only). With
        ``keep_sources`` the adapter's page-locked host copies are kept for its next write.
        """
        assert self._prefetcher is not None
        prefetcher = self._prefetcher
        sources = self._host_sources(adapter, keep_sources) if adapter is not None else {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        zeros: list[torch.Tensor] = []
        new_ranks: list[tuple[LoRASlotWeights, list[int]]] = []
        for weights, slices in self._groups:
            zeros += [weights.lora_a[slot], weights.lora_b[slot]]
            ranks = [0] * len(weights.slice_widths)
            scales = [0.0] * len(weights.slice_widths)
            for key, index in slices:
                module = adapter.modules.get(key) if adapter is not None else None
                if module is None:
                    continue
                a, b = sources[key]
                rank, offset = module.rank, sum(weights.slice_widths[:index])
                width = weights.slice_widths[index]
                copies.append((weights.lora_a[slot, index, :rank], a))
                copies.append((weights.lora_b[slot, offset:offset + width, :rank], b))
                ranks[index], scales[index] = rank, module.scale
            copies.append((weights.ranks[slot],
                           prefetcher.pin(torch.tensor(ranks, dtype=weights.ranks.dtype))))
            copies.append((weights.scales[slot],
                           prefetcher.pin(torch.tensor(scales, dtype=weights.scales.dtype))))
            new_ranks.append((weights, ranks))
        self._tickets[slot] = prefetcher.submit(copies, zeros)
        for weights, ranks in new_ranks:
            weights.ranks_cpu[slot] = ranks

    def _host_sources(self, adapter: LoRAAdapter, keep: bool
                      ) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
        """``module -> (A, B)`` host tensors of ``adapter`` in its slots' dtype, page-locked on
        CUDA machines; with ``keep``, kept until ``forget``."""
        cached = self._pinned_sources.get(adapter.name)
        if cached is not None:
            return cached
        assert self._prefetcher is not None
        sources: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, module in adapter.modules.items():
            entry = self._slot_map.get(key)
            if entry is None:
                continue
            dtype = entry[0].lora_a.dtype
            sources[key] = (self._prefetcher.pin(module.a.to(dtype).contiguous()),
                            self._prefetcher.pin(module.b.to(dtype).contiguous()))
        if keep:
            self._pinned_sources[adapter.name] = sources
        return sources

    def discard(self, slot: int) -> None:
        """After a failed write: the slot holds no adapter and reads as rank 0 everywhere."""
        self._tickets.pop(slot, None)
        for weights, _ in self._groups:
            weights.ranks_cpu[slot] = [0] * len(weights.slice_widths)
            try:
                weights.ranks[slot].zero_()
            except RuntimeError as exc:  # the device itself is failing: the step will say so
                logger.warning("could not reset the ranks of slot %d: %s", slot, exc)

    def _check_slot_map(self, base: BaseModelShapes, max_loras: int) -> None:
        for (layer, module), (weights, index) in self._slot_map.items():
            in_features, out_features = base.module_shape(module)
            if weights.num_slots < max_loras:
                raise ValoraError(f"slot weights of layer {layer} {module} have "
                                  f"{weights.num_slots} slots < max_loras={max_loras}")
            if not 0 <= index < len(weights.slice_widths) or \
                    weights.slice_widths[index] != out_features or \
                    weights.lora_a.shape[3] != in_features:
                raise ValoraError(f"slot map entry layer {layer} {module} (slice {index} of "
                                  f"{weights.slice_widths}, in {weights.lora_a.shape[3]}) does not "
                                  f"match the base model ({in_features} -> {out_features})")
        for weights, _ in self._groups:
            if len(weights.ranks_cpu) != weights.num_slots:
                weights.ranks_cpu[:] = weights.ranks.tolist()



def _group_by_linear(slot_map: SlotMap
                     ) -> list[tuple[LoRASlotWeights, list[tuple[ModuleKey, int]]]]:
    """Entries grouped by their (fused) linear, so each slot of each linear is written once."""
    groups: dict[int, tuple[LoRASlotWeights, list[tuple[ModuleKey, int]]]] = {}
    for key, (weights, index) in slot_map.items():
        groups.setdefault(id(weights), (weights, []))[1].append((key, index))
    return list(groups.values())
