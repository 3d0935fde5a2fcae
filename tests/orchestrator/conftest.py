"""Fixtures for orchestrator tests: real fused weights + LoRA slot storage in the model's layout.

``SlotModel`` mirrors what ``model.lora_base_weights()`` / ``model.lora_slot_map()`` return: per
(layer, PEFT module) a view of that module's rows of a fused base weight, and the fused slot
weights with the module's slice index. Adapters have mixed ranks and leave some modules untargeted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from valora.ops.lora import LoRASlotWeights

HIDDEN = 32
INTERMEDIATE = 48
NUM_LAYERS = 2
FUSED = {  # fused linear -> (PEFT modules, slice widths, in_features)
    "qkv_proj": (("q_proj", "k_proj", "v_proj"), (HIDDEN, HIDDEN // 2, HIDDEN // 2), HIDDEN),
    "o_proj": (("o_proj",), (HIDDEN,), HIDDEN),
    "gate_up_proj": (("gate_proj", "up_proj"), (INTERMEDIATE, INTERMEDIATE), HIDDEN),
    "down_proj": (("down_proj",), (HIDDEN,), INTERMEDIATE),
}
NUM_SLOTS = 4
MAX_RANK = 16
# slot -> (rank, targeted PEFT modules); slot 3 is empty.
ADAPTERS = {
    0: (8, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    1: (4, {"q_proj", "v_proj"}),
    2: (16, {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}),
}

Key = tuple[int, str]


@dataclass
class SlotModel:
    fused_weights: dict[tuple[int, str], torch.Tensor]
    slot_weights: dict[tuple[int, str], LoRASlotWeights]
    base_weights: dict[Key, torch.Tensor]
    slot_map: dict[Key, tuple[LoRASlotWeights, int]]

    def fused_of(self, key: Key) -> tuple[torch.Tensor, LoRASlotWeights]:
        for (layer, fused), (modules, _, _) in FUSED.items():
            if layer == key[0] and key[1] in modules:
                return self.fused_weights[(layer, fused)], self.slot_weights[(layer, fused)]
        raise KeyError(key)


def build_slot_model(dtype: torch.dtype, seed: int = 0) -> SlotModel:
    gen = torch.Generator().manual_seed(seed)
    fused_weights: dict[tuple[int, str], torch.Tensor] = {}
    slot_weights: dict[tuple[int, str], LoRASlotWeights] = {}
    base: dict[Key, torch.Tensor] = {}
    slot_map: dict[Key, tuple[LoRASlotWeights, int]] = {}
    for layer in range(NUM_LAYERS):
        for fused, (modules, widths, in_features) in FUSED.items():
            weight = (torch.randn(sum(widths), in_features, generator=gen) * 0.5).to(dtype)
            slots = LoRASlotWeights.empty(NUM_SLOTS, MAX_RANK, in_features, widths, dtype, "cpu")
            fused_weights[(layer, fused)] = weight
            slot_weights[(layer, fused)] = slots
            offset = 0
            for j, (module, width) in enumerate(zip(modules, widths, strict=True)):
                base[(layer, module)] = weight[offset:offset + width]
                slot_map[(layer, module)] = (slots, j)
                for slot, (rank, targets) in ADAPTERS.items():
                    if module not in targets:
                        continue
                    slots.lora_a[slot, j, :rank] = torch.randn(rank, in_features, generator=gen).to(dtype)
                    slots.lora_b[slot, offset:offset + width, :rank] = (
                        torch.randn(width, rank, generator=gen) * 0.3).to(dtype)
                    slots.ranks[slot, j] = rank
                    slots.ranks_cpu[slot][j] = rank
                    slots.scales[slot, j] = 2.0 / rank
                offset += width
    return SlotModel(fused_weights, slot_weights, base, slot_map)


@pytest.fixture
def slot_model_factory() -> Callable[..., SlotModel]:
    return build_slot_model


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids spin-waiting on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
