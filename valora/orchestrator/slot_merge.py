"""Merging the adapter of one LoRA slot into the base weights, on the device and from graphs.

``SlotMerger`` is ``WeightSwitcher``'s merge path for pristine restore with the Triton kernel on
half-precision weights: one ``lowrank_update_slot`` launch per targeted module, each reading the
slot's rank and scale on the device. The first merge of a (slot, rank block, module set) runs
eagerly (and compiles); the second captures the launches in a CUDA graph, which every later
merge of that key replays, whatever adapter the slot holds by then — the graph reads the slot
storage, which keeps its addresses. 224 Python launches at 7B shapes cost the host more than
the GPU needed for them (``bench/results/serve``: 1.7–2.9× the copy floor eager, 1.22–1.53×
replayed). ``warm_up`` compiles every kernel variant before the first switch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from valora.errors import ValoraError
from valora.ops.lora import LoRASlotWeights
from valora.ops.merge_kernel import lowrank_update_slot

ModuleKey = tuple[int, str]
GraphKey = tuple[int, int, tuple[ModuleKey, ...]]


def rank_block(rank: int) -> int:
    """The kernel's rank axis for ``rank``: a power of two, at least 16."""
    return max(16, 1 << (max(rank, 1) - 1).bit_length())


class SlotMerger:
    """``W[key] = round(W[key] + s·B·A)`` for the modules an adapter slot targets (module
    docstring). ``weights[key]`` and ``slots[key] = (slot_weights, slice_index)`` as in
    ``WeightSwitcher``; both keep their storage for the merger's lifetime."""

    def __init__(self, weights: Mapping[ModuleKey, torch.Tensor],
                 slots: Mapping[ModuleKey, tuple[LoRASlotWeights, int]], graphs: bool) -> None:
        self._weights = dict(weights)
        self._slots = dict(slots)
        self._columns = {key: (sum(w.slice_widths[:j]), w.slice_widths[j])
                         for key, (w, j) in self._slots.items()}
        self._graphs_enabled = graphs
        self._graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self._warm: set[GraphKey] = set()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def targeted(self, slot: int) -> tuple[ModuleKey, ...]:
        """Modules the adapter in ``slot`` targets (rank > 0 in the host ranks)."""
        keys = []
        for key, (weights, j) in self._slots.items():
            if not 0 <= slot < weights.num_slots:
                raise ValoraError(f"slot {slot} out of range [0, {weights.num_slots}) for {key}")
            if int(weights.host_ranks()[slot][j]) > 0:
                keys.append(key)
        return tuple(keys)

    def merge(self, slot: int, keys: tuple[ModuleKey, ...]) -> None:
        """Merge the slot's adapter into ``keys`` (eager, capture or replay: module docstring)."""
        block = rank_block(max(self._rank_of(slot, key) for key in keys))
        graph_key = (slot, block, keys)
        graph = self._graphs.get(graph_key)
        if graph is not None:
            graph.replay()
            return
        capture = (self._graphs_enabled and graph_key in self._warm
                   and all(self._weights[key].is_cuda for key in keys))
        if not capture:
            self._launch(slot, keys, block)
            self._warm.add(graph_key)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._launch(slot, keys, block)
        self._graphs[graph_key] = graph
        graph.replay()

    def warm_up(self) -> int:
        """Compile the kernel for every module shape and rank block a merge can meet. Launches
        read a zero rank and return before touching any weight. Returns the launches made."""
        zeros: dict[torch.device, torch.Tensor] = {}
        seen: set[tuple[object, ...]] = set()
        for key, weight in self._weights.items():
            weights, _ = self._slots[key]
            zero = zeros.setdefault(weight.device,
                                    torch.zeros(1, dtype=torch.int32, device=weight.device))
            block = 16
            while True:
                rank = min(block, weights.max_rank)
                signature = (tuple(weight.shape), weight.stride(), weight.dtype, rank,
                             weights.max_rank, weights.lora_a.shape[-1])
                if signature not in seen:
                    seen.add(signature)
                    self._launch_one(key, 0, rank, zero)
                if block >= weights.max_rank:
                    break
                block *= 2
        return len(seen)

    def _rank_of(self, slot: int, key: ModuleKey) -> int:
        weights, j = self._slots[key]
        return min(int(weights.host_ranks()[slot][j]), weights.max_rank)

    def _launch(self, slot: int, keys: tuple[ModuleKey, ...], block: int) -> None:
        for key in keys:
            weights, j = self._slots[key]
            self._launch_one(key, slot, min(block, weights.max_rank),
                             weights.ranks[slot, j:j + 1])

    def _launch_one(self, key: ModuleKey, slot: int, rank: int, rank_ref: torch.Tensor) -> None:
        weights, j = self._slots[key]
        offset, width = self._columns[key]
        lowrank_update_slot(self._weights[key], weights.lora_b[slot, offset:offset + width, :rank],
                            weights.lora_a[slot, j, :rank], weights.scales[slot, j:j + 1],
                            rank_ref)
