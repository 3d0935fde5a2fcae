"""AdapterManager: slot contents drive lora_apply correctly, LRU residency, pins, host cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from valora.config import LoRAConfig
from valora.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    ValoraError,
)
from valora.lora.adapter import LANGUAGE_MODULES
from valora.lora.adapter_manager import AdapterManager, SlotMap
from valora.lora.shapes import BaseModelShapes
from valora.ops.lora import lora_apply, prepare_lora_batch

SlotMapFactory = Callable[..., SlotMap]


def _manager(make_slot_map: SlotMapFactory, base: BaseModelShapes, max_loras: int = 2,
             max_cpu_loras: int = 8, max_rank: int = 8, garbage: bool = False) -> AdapterManager:
    config = LoRAConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_rank)
    return AdapterManager(make_slot_map(max_loras, max_rank, garbage=garbage), config, base)


def _file_delta(path: Path, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
    """``scale * x @ A.T @ B.T`` straight from the adapter files (None: module not targeted)."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    kind = "self_attn" if module in LANGUAGE_MODULES[:4] else "mlp"
    key = f"base_model.model.model.language_model.layers.{layer}.{kind}.{module}"
    if f"{key}.lora_A.weight" not in tensors:
        return None
    a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    scale = config["lora_alpha"] / config["r"]
    return scale * (x @ a.T) @ b.T


@pytest.mark.parametrize("b_layout", ["column", "rank"])
def test_acquired_slots_compute_each_tokens_adapter(make_slot_map: SlotMapFactory,
                                                    base_shapes: BaseModelShapes,
                                                    adapter_pool: list[Path], b_layout: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Slots start full of garbage; after acquire, lora_apply equals the adapter file's math
    for every module, per token, and rows without an adapter get nothing — with ``lora_b``
    stored either way (``VALORA_LORA_B_LAYOUT``: the slot writer writes through the view)."""
    monkeypatch.setenv("VALORA_LORA_B_LAYOUT", b_layout)
    manager = _manager(make_slot_map, base_shapes, max_loras=3, garbage=True)
    assert all(w.b_rank_major == (b_layout == "rank") for w, _ in manager._slot_map.values())
    paths = {"full": adapter_pool[0], "qv": adapter_pool[1], "mlp": adapter_pool[2]}
    slots = {}
    for name, path in paths.items():
        manager.register(name, path)
        slots[name] = manager.acquire(name)
    assert sorted(slots.values()) == [0, 1, 2]
    order = ["qv", "full", "mlp", None, "full", "qv", None, "mlp"]
    token_slots = torch.tensor([slots[n] if n else -1 for n in order], dtype=torch.int32)
    batch = prepare_lora_batch(token_slots, manager.num_slots)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for (layer, module), (weights, index) in manager._slot_map.items():
        x = torch.randn(len(order), weights.lora_a.shape[3], generator=gen)
        y = torch.zeros(len(order), sum(weights.slice_widths))
        lora_apply(y, x, weights, batch)
        offset = sum(weights.slice_widths[:index])
        got = y[:, offset:offset + weights.slice_widths[index]]
        for t, name in enumerate(order):
            delta = _file_delta(paths[name], layer, module, x[t:t + 1]) if name else None
            expected = torch.zeros_like(got[t:t + 1]) if delta is None else delta
            torch.testing.assert_close(got[t:t + 1], expected, rtol=1e-5, atol=1e-5)
            checked += delta is not None
    assert checked > 0
    manager.check_invariants()


def test_reloaded_slot_clears_untargeted_slices(make_slot_map: SlotMapFactory,
                                                base_shapes: BaseModelShapes,
                                                adapter_pool: list[Path]) -> None:
    manager = _manager(make_slot_map, base_shapes, max_loras=1)
    manager.register("full", adapter_pool[0])
    manager.register("qv", adapter_pool[1])
    assert manager.acquire("full") == 0
    manager.release("full")
    assert manager.acquire("qv") == 0  # evicts "full" from the only slot
    assert manager.residency("full") == "cpu" and manager.slot_of("full") is None
    weights, _ = manager._slot_map[(0, "q_proj")]
    assert weights.ranks_cpu[0] == [4, 0, 4] == weights.ranks[0].tolist()
    assert weights.scales[0, 1] == 0 and weights.lora_a[0, 1].abs().sum() == 0
    down, _ = manager._slot_map[(1, "down_proj")]
    assert down.ranks_cpu[0] == [0] and down.lora_b[0].abs().sum() == 0


def test_lru_eviction_and_pins(make_slot_map: SlotMapFactory, base_shapes: BaseModelShapes,
                               adapter_pool: list[Path]) -> None:
    manager = _manager(make_slot_map, base_shapes, max_loras=2)
    for i, name in enumerate("abc"):
        manager.register(name, adapter_pool[i])
    slot_a, slot_b = manager.acquire("a"), manager.acquire("b")
    assert manager.acquire("c") is None  # both slots pinned by others
    assert manager.acquire("a") == slot_a and manager.pin_count("a") == 2
    manager.release("a")
    assert manager.acquire("c") is None  # "a" still holds one pin
    manager.release("a")
    manager.release("b")
    # "a" was released first, so it is the least recently used resident.
    assert manager.acquire("c") == slot_a
    assert manager.residency("a") == "cpu" and manager.residency("b") == "device"
    assert manager.acquire("a") == slot_b  # now "b" is the only unpinned resident
    stats = manager.stats()
    assert (stats.num_resident, stats.num_pinned, stats.slot_evictions) == (2, 2, 2)
    manager.check_invariants()
    with pytest.raises(InvalidRequestError, match="in use by 1 running request"):
        manager.unregister("c")
    manager.release("c")
    manager.unregister("c")
    weights, _ = manager._slot_map[(0, "q_proj")]
    assert weights.ranks[slot_a].tolist() == [0, 0, 0] and manager.stats().num_free_slots == 1
    with pytest.raises(ValoraError, match="without a matching acquire"):
        manager.release("b")
    manager.check_invariants()


def test_registry_errors(make_slot_map: SlotMapFactory, base_shapes: BaseModelShapes,
                         adapter_pool: list[Path], tmp_path: Path) -> None:
    manager = _manager(make_slot_map, base_shapes, max_rank=3)
    manager.register("small", adapter_pool[0])
    with pytest.raises(AdapterNotFoundError, match="'nope' is not registered; known adapters: sm"):
        manager.resolve("nope")
    with pytest.raises(AdapterNotFoundError):
        manager.acquire("nope")
    with pytest.raises(InvalidAdapterError, match="already registered"):
        manager.register("small", adapter_pool[3])
    with pytest.raises(InvalidAdapterError, match="rank 4 exceeds max_lora_rank=3"):
        manager.register("big", adapter_pool[1])
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        manager.register("gone", tmp_path / "gone")
    assert [info.name for info in manager.list_adapters()] == ["small"]
    manager.check_invariants()


def test_model_without_some_linears_rejects_adapter(make_slot_map: SlotMapFactory,
                                                    base_shapes: BaseModelShapes,
                                                    adapter_pool: list[Path]) -> None:
    slot_map = {k: v for k, v in make_slot_map(2, 8).items() if k[1] != "down_proj"}
    manager = AdapterManager(slot_map, LoRAConfig(max_loras=2, max_lora_rank=8), base_shapes)
    manager.register("qv", adapter_pool[1])
    with pytest.raises(InvalidAdapterError, match="does not expose"):
        manager.register("mlp", adapter_pool[2])


def test_host_cache_lru_rereads_from_disk(make_slot_map: SlotMapFactory,
                                          base_shapes: BaseModelShapes,
                                          adapter_pool: list[Path], tmp_path: Path) -> None:
    manager = _manager(make_slot_map, base_shapes, max_loras=1, max_cpu_loras=2)
    path_a = Path(shutil.copytree(adapter_pool[0], tmp_path / "a"))
    first = manager.register("a", path_a)
    manager.register("b", adapter_pool[1])
    manager.register("c", adapter_pool[2])
    assert manager.residency("a") == "none" and manager.stats().cpu_evictions == 1
    loads = manager.stats().disk_loads
    again = manager.resolve("a")
    assert again.digest == first.digest and manager.stats().disk_loads == loads + 1
    assert manager.residency("a") == "cpu" and manager.residency("b") == "none"
    info = {i.name: i for i in manager.list_adapters()}
    assert info["a"].digest == first.digest and info["a"].rank == 2 and info["a"].pin_count == 0
    assert info["b"].target_modules == ("q_proj", "v_proj") and info["a"].nbytes == first.nbytes

    manager.register("d", adapter_pool[3])
    manager.resolve("b")  # host cache now holds d, b: "a" is out again
    assert manager.residency("a") == "none"
    tensors = load_file(str(path_a / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(path_a / "adapter_model.safetensors"))
    with pytest.raises(InvalidAdapterError, match="changed on disk"):
        manager.acquire("a")
    assert manager.slot_of("a") is None
    manager.check_invariants()


def test_slot_map_must_match_base(make_slot_map: SlotMapFactory,
                                  base_shapes: BaseModelShapes) -> None:
    other = BaseModelShapes(num_layers=2, hidden=64, intermediate=96, num_heads=4,
                            num_kv_heads=2, head_dim=16)
    with pytest.raises(ValoraError, match="does not match the base model"):
        AdapterManager(make_slot_map(2, 8), LoRAConfig(max_loras=2), other)
    with pytest.raises(ValoraError, match="slots < max_loras=4"):
        AdapterManager(make_slot_map(2, 8), LoRAConfig(max_loras=4), base_shapes)


def test_empty_slot_map_means_lora_disabled(base_shapes: BaseModelShapes,
                                            adapter_pool: list[Path]) -> None:
    manager = AdapterManager({}, LoRAConfig(), base_shapes)
    assert manager.num_slots == 0 and manager.stats().num_free_slots == 0
    with pytest.raises(InvalidAdapterError, match="LoRA is disabled"):
        manager.register("a", adapter_pool[0])
    assert manager.list_adapters() == []


@pytest.mark.gpu
def test_slot_writes_on_cuda_in_bfloat16(make_slot_map: SlotMapFactory,
                                         base_shapes: BaseModelShapes,
                                         adapter_pool: list[Path]) -> None:
    """Same contents as a float32 CPU manager, up to bfloat16 rounding, with any backend."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = LoRAConfig(max_loras=2, max_lora_rank=8)
    cpu = AdapterManager(make_slot_map(2, 8), config, base_shapes)
    gpu = AdapterManager(make_slot_map(2, 8, torch.bfloat16, garbage=True, device="cuda"), config,
                         base_shapes)
    for manager in (cpu, gpu):
        for name, path in (("a", adapter_pool[0]), ("b", adapter_pool[4])):
            manager.register(name, path)
            manager.acquire(name)
    token_slots = torch.tensor([1, 0, -1, 1, 0], dtype=torch.int32)
    for key, (weights, _) in gpu._slot_map.items():
        reference = cpu._slot_map[key][0]
        assert weights.ranks.tolist() == reference.ranks.tolist() == weights.ranks_cpu
        x = torch.randn(5, weights.lora_a.shape[3])
        expected = torch.zeros(5, sum(weights.slice_widths))
        lora_apply(expected, x, reference, prepare_lora_batch(token_slots, 2))
        got = torch.zeros_like(expected, device="cuda", dtype=torch.bfloat16)
        batch = prepare_lora_batch(token_slots.cuda(), 2, backend="auto")
        lora_apply(got, x.cuda().bfloat16(), weights, batch)
        torch.testing.assert_close(got.float().cpu(), expected, rtol=3e-2, atol=3e-2)
