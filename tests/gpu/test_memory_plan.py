"""Memory planning arithmetic, the profiling batch, byte accounting and the slot prefetcher.

CPU: the plan's arithmetic and table, the profiling batch layout, parameter/slot byte counts
and synchronous prefetch copies. ``gpu``: a real profiling pass and side-stream prefetch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attn_cases import DEVICE

import valora.layers.attention_triton  # noqa: F401  (registers the "triton" backend)
from valora.engine.memory_plan import (
    MIB,
    MemoryPlan,
    SlotPrefetcher,
    kv_bytes_per_page,
    plan_gpu_memory,
    profiling_batch,
    weight_and_slot_bytes,
)
from valora.errors import OutOfResourcesError, ValoraError
from valora.models.loader import load_model


def make_plan(**overrides: int | float) -> MemoryPlan:
    fields: dict[str, int | float] = dict(
        total_bytes=1000 * MIB, memory_fraction=0.9, in_use_bytes=300 * MIB,
        weight_bytes=200 * MIB, adapter_slot_bytes=50 * MIB, activation_peak_bytes=100 * MIB,
        graph_reserve_bytes=20 * MIB, bytes_per_page=MIB)
    fields.update(overrides)
    return MemoryPlan(**fields)  # type: ignore[arg-type]


def test_plan_arithmetic_and_table() -> None:
    plan = make_plan()
    assert plan.budget_bytes == 900 * MIB and plan.other_bytes == 50 * MIB
    assert plan.num_pages == 900 - 300 - 100 - 20
    plan.check()
    lines = plan.table().splitlines()
    assert any(line.startswith("kv cache (480 pages)") for line in lines)
    shares = [float(line.split()[-2]) for line in lines[1:-1]]
    assert sum(shares) == pytest.approx(1000.0, abs=0.5), "rows add up to the device"


def test_pristine_copy_is_its_own_row_and_costs_kv_pages() -> None:
    plan = make_plan(in_use_bytes=330 * MIB, pristine_bytes=30 * MIB)
    assert plan.other_bytes == 50 * MIB and plan.num_pages == 900 - 330 - 100 - 20
    row = next(line for line in plan.table().splitlines() if line.startswith("pristine copy"))
    assert float(row.split()[-2]) == pytest.approx(30.0)


def test_plan_without_room_raises() -> None:
    plan = make_plan(activation_peak_bytes=700 * MIB)
    assert plan.num_pages == 0
    with pytest.raises(OutOfResourcesError, match="memory_fraction"):
        plan.check()


@pytest.mark.parametrize(("tokens", "seqs", "page_size"), [(37, 4, 4), (5, 9, 16), (64, 1, 8)])
def test_profiling_batch_layout(tokens: int, seqs: int, page_size: int) -> None:
    batch, pages = profiling_batch(tokens, seqs, page_size, torch.device("cpu"), lora_slots=3,
                                   lora_backend="reference")
    attn = batch.attn
    assert batch.num_tokens == tokens == sum(attn.query_lens_cpu)
    assert attn.num_seqs == min(seqs, tokens)
    assert attn.query_lens_cpu == attn.seq_lens_cpu, "fresh prefills: nothing cached"
    slots = attn.slot_mapping.tolist()
    assert len(set(slots)) == tokens and min(slots) >= page_size, "page 0 is never written"
    assert max(slots) < pages * page_size
    assert batch.lora is not None and batch.lora.token_slots.max().item() == 2


def test_byte_accounting(tiny_llava: Path) -> None:
    model = load_model(str(tiny_llava), dtype=torch.float32, device="cpu")
    model.init_lora(3, 4)
    weights, slots = weight_and_slot_bytes(model)
    assert weights == sum(p.numel() * 4 for p in model.parameters())
    per_linear = [w for w, index in model.lora_slot_map().values() if index == 0]
    assert slots == sum(w.lora_a.nbytes + w.lora_b.nbytes + w.ranks.nbytes + w.scales.nbytes
                        for w in per_linear)
    spec = model.spec
    assert kv_bytes_per_page(model, 16, torch.bfloat16) == (
        2 * spec.num_layers * 16 * spec.num_kv_heads * spec.head_dim * 2)


def test_prefetch_copies_into_slots() -> None:
    prefetcher = SlotPrefetcher(DEVICE)
    slot = torch.randn(4, 6, device=DEVICE)
    rows = torch.randn(2, 6)
    ticket = prefetcher.submit([(slot[1:3], prefetcher.pin(rows))], zeros=[slot[3]])
    ticket.wait()
    assert torch.equal(slot[1:3].cpu(), rows) and not slot[3].any()
    if DEVICE.type == "cpu":
        assert ticket.ready()
    with pytest.raises(ValoraError, match="copy 0"):
        prefetcher.submit([(slot[0], rows)])


@pytest.mark.gpu
def test_gpu_plan_and_prefetch(tiny_llava: Path) -> None:
    model = load_model(str(tiny_llava), dtype=torch.bfloat16, device=DEVICE,
                       attention_backend="triton")
    model.init_lora(4, 8)
    plan = plan_gpu_memory(model, page_size=16, memory_fraction=0.5, max_num_tokens=2048,
                           max_num_seqs=16, graph_batch=16, lora_backend="triton")
    assert plan.activation_peak_bytes > 0 and plan.graph_reserve_bytes > 0
    assert plan.num_pages > 1000 and "kv cache" in plan.table()
    assert not model.kv_caches, "the profiling cache is gone again"
    prefetcher = SlotPrefetcher(DEVICE)
    slot = torch.zeros(64, 1024, device=DEVICE)
    rows = prefetcher.pin(torch.randn(64, 1024))
    ticket = prefetcher.submit([(slot, rows)])
    ticket.wait()
    assert torch.equal(slot.cpu(), rows)
    torch.cuda.synchronize()
    assert ticket.ready()
