"""Property test: random register/unregister/acquire/release sequences keep the manager sound."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valora.config import LoRAConfig
from valora.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    ValoraError,
)
from valora.lora.adapter_manager import AdapterManager, SlotMap
from valora.lora.shapes import BaseModelShapes

MAX_LORAS = 2
# acquire is listed twice so that pins pile up and slots run out often.
KINDS = ["register", "acquire", "acquire", "release", "unregister"]
OPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 3)), max_size=50)


def _check_slot_contents(manager: AdapterManager) -> None:
    """Each resident adapter's ranks are what the slots say, slice by slice."""
    for info in manager.list_adapters():
        if info.slot is None:
            continue
        adapter = manager.resolve(info.name)
        for key, (weights, index) in manager._slot_map.items():
            module = adapter.modules.get(key)
            assert weights.ranks_cpu[info.slot][index] == (module.rank if module else 0)


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_operation_sequences(ops: list[tuple[str, int]],
                                    make_slot_map: Callable[..., SlotMap],
                                    base_shapes: BaseModelShapes,
                                    adapter_pool: list[Path]) -> None:
    config = LoRAConfig(max_loras=MAX_LORAS, max_cpu_loras=3, max_lora_rank=4)
    manager = AdapterManager(make_slot_map(MAX_LORAS, 4), config, base_shapes)
    pins: dict[str, int] = {}  # the model: registered name -> pins held
    for kind, index in ops:
        name = f"a{index}"
        if kind == "register":
            if name in pins:
                with pytest.raises(InvalidAdapterError):
                    manager.register(name, adapter_pool[index])
            else:
                manager.register(name, adapter_pool[index])
                pins[name] = 0
        elif name not in pins:
            operation = getattr(manager, kind)
            with pytest.raises(AdapterNotFoundError):
                operation(name)
        elif kind == "unregister":
            if pins[name] > 0:
                with pytest.raises(InvalidRequestError):
                    manager.unregister(name)
            else:
                manager.unregister(name)
                del pins[name]
        elif kind == "acquire":
            was_resident = manager.slot_of(name) is not None
            pinned_by_others = sum(1 for n, p in pins.items() if n != name and p > 0)
            slot = manager.acquire(name)
            if slot is None:
                assert not was_resident and pinned_by_others == MAX_LORAS
            else:
                assert 0 <= slot < MAX_LORAS
                pins[name] += 1
        elif pins[name] == 0:
            with pytest.raises(ValoraError):
                manager.release(name)
        else:
            manager.release(name)
            pins[name] -= 1
        manager.check_invariants()
        assert {i.name: i.pin_count for i in manager.list_adapters()} == pins
    _check_slot_contents(manager)

    for name, count in pins.items():
        for _ in range(count):
            manager.release(name)
    for index in range(len(adapter_pool)):
        if f"a{index}" not in pins:
            manager.register(f"a{index}", adapter_pool[index])
    stats = manager.stats()
    assert stats.num_pinned == 0
    # Every slot is evictable now: any MAX_LORAS distinct adapters fit at once.
    for names in (["a0", "a1"], ["a2", "a3"], ["a4", "a0"]):
        slots = [manager.acquire(n) for n in names]
        assert None not in slots and len(set(slots)) == MAX_LORAS
        for n in names:
            manager.release(n)
        manager.check_invariants()
    _check_slot_contents(manager)
