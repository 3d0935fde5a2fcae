"""LoRA test fixtures: one tiny LLaVA, a few adapters, and slot maps like the model's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from valora.lora.adapter import ATTENTION_MODULES, LANGUAGE_MODULES, ModuleKey
from valora.lora.shapes import BaseModelShapes
from valora.ops.lora import LoRASlotWeights
from valora.testing.checkpoints import build_tiny_adapter, build_tiny_llava

SlotMapFactory = Callable[..., dict[ModuleKey, tuple[LoRASlotWeights, int]]]  # see tests


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def base_shapes(llava_dir: Path) -> BaseModelShapes:
    return BaseModelShapes.from_config_json(llava_dir)


@pytest.fixture(scope="session")
def adapter_dir(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rank 4, alpha 8, every language projection."""
    return build_tiny_adapter(llava_dir, tmp_path_factory.mktemp("adapter"), rank=4, alpha=8.0)


@pytest.fixture(scope="session")
def adapter_pool(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five small adapters with different ranks, targets and seeds."""
    root = tmp_path_factory.mktemp("pool")
    specs: list[tuple[int, tuple[str, ...]]] = [
        (2, LANGUAGE_MODULES), (4, ("q_proj", "v_proj")),
        (3, ("gate_proj", "up_proj", "down_proj")), (1, ATTENTION_MODULES),
        (4, ("k_proj", "o_proj", "down_proj"))]
    return [build_tiny_adapter(llava_dir, root / f"a{i}", rank=rank, targets=targets, seed=i + 1)
            for i, (rank, targets) in enumerate(specs)]


@pytest.fixture(scope="session")
def make_slot_map(base_shapes: BaseModelShapes) -> SlotMapFactory:
    """Build a slot map like ``model.lora_slot_map()``: fused qkv (3 slices), o, gate_up (2),
    down."""

    def make(num_slots: int, max_rank: int, dtype: torch.dtype = torch.float32,
             garbage: bool = False, device: str = "cpu"
             ) -> dict[ModuleKey, tuple[LoRASlotWeights, int]]:
        b = base_shapes
        slot_map: dict[ModuleKey, tuple[LoRASlotWeights, int]] = {}
        for layer in range(b.num_layers):
            fused: list[tuple[tuple[str, ...], int]] = [
                (("q_proj", "k_proj", "v_proj"), b.hidden), (("o_proj",), b.num_heads * b.head_dim),
                (("gate_proj", "up_proj"), b.hidden), (("down_proj",), b.intermediate)]
            for modules, in_features in fused:
                widths = tuple(b.module_shape(m)[1] for m in modules)
                weights = LoRASlotWeights.empty(num_slots, max_rank, in_features, widths, dtype,
                                                device)
                if garbage:  # stale content a slot write must overwrite
                    for t in (weights.lora_a, weights.lora_b, weights.scales):
                        t.normal_()
                    weights.ranks.fill_(max_rank)
                    weights.ranks_cpu = weights.ranks.tolist()
                for index, module in enumerate(modules):
                    slot_map[(layer, module)] = (weights, index)
        return slot_map

    return make
