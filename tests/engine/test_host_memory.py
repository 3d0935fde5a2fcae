"""The staging pool's lease / event / reuse rules (``valora.engine.host_memory``), with fake device
events on the CPU; the CUDA side (registration, the fault it exists for) is
``tests/gpu/test_device_fault_cuda.py`` and every CUDA engine test."""

from __future__ import annotations

import gc
from typing import ClassVar

import pytest
import torch

from valora.engine.host_memory import (
    ALIGN,
    MIN_STAGING_BYTES,
    StagingPool,
    byte_view,
    packed_offsets,
    page_locked_empty,
)


class FakeEvent:
    """Records how often it was recorded and waited on; ``pending`` until synchronised."""

    log: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.pending = False

    def record(self) -> None:
        self.pending = True
        FakeEvent.log.append("record")

    def query(self) -> bool:
        return not self.pending

    def synchronize(self) -> None:
        FakeEvent.log.append("wait" if self.pending else "wait-done")
        self.pending = False

    def complete(self) -> None:
        self.pending = False


@pytest.fixture
def pool() -> StagingPool:
    FakeEvent.log = []
    return StagingPool(lambda n: torch.empty(n, dtype=torch.uint8), FakeEvent)


def test_a_busy_buffer_is_not_waited_for_while_another_can_be_made(pool: StagingPool) -> None:
    first = pool.lease(100)
    assert first.buffer.numel() == 100 and pool.num_buffers == 1
    first.mark_queued()
    first_ptr = first.buffer.data_ptr()
    event = first._entry.event
    first.release()
    second = pool.lease(200)  # the first buffer's copy is still queued: a second buffer
    assert second.buffer.data_ptr() != first_ptr and pool.num_buffers == 2
    assert FakeEvent.log == ["record"]  # no wait: the host never stalls on the step in flight
    second.release()
    assert isinstance(event, FakeEvent)
    event.complete()
    third = pool.lease(50)  # both free and idle now: the smallest that fits, reused
    assert third.buffer.data_ptr() in (first_ptr, second.buffer.data_ptr())
    assert pool.num_buffers == 2


def test_at_the_buffer_limit_a_lease_waits_for_the_copies(pool: StagingPool) -> None:
    pool.max_buffers = 1
    first = pool.lease(100)
    first.mark_queued()
    data_ptr = first.buffer.data_ptr()
    first.release()
    second = pool.lease(200)
    assert second.buffer.data_ptr() == data_ptr and pool.num_buffers == 1
    assert FakeEvent.log == ["record", "wait"]  # the queued copy is waited for before reuse


def test_a_leased_buffer_is_never_handed_out_twice(pool: StagingPool) -> None:
    held = pool.lease(10)
    other = pool.lease(10)
    assert other.buffer.data_ptr() != held.buffer.data_ptr() and pool.num_buffers == 2
    held.release()
    held.release()  # idempotent
    again = pool.lease(10)
    assert again.buffer.data_ptr() == held.buffer.data_ptr()
    assert FakeEvent.log == []  # nothing was queued: no event, no wait


def test_a_dropped_lease_returns_its_buffer(pool: StagingPool) -> None:
    pool.max_buffers = 1
    lease = pool.lease(10)
    lease.mark_queued()
    data_ptr = lease.buffer.data_ptr()
    del lease
    gc.collect()
    assert pool.lease(10).buffer.data_ptr() == data_ptr
    assert FakeEvent.log == ["record", "wait"]


def test_a_larger_request_replaces_the_smallest_free_buffer(pool: StagingPool) -> None:
    pool.max_buffers = 1
    small = pool.lease(10)
    small.mark_queued()
    small.release()
    big = pool.lease(MIN_STAGING_BYTES + 1)
    assert pool.num_buffers == 1 and pool.capacity_bytes == 2 * MIN_STAGING_BYTES
    assert big.buffer.numel() == MIN_STAGING_BYTES + 1
    assert FakeEvent.log == ["record", "wait"]  # the replaced buffer's copy completed first


def test_synchronize_waits_once(pool: StagingPool) -> None:
    lease = pool.lease(8)
    lease.synchronize()  # nothing queued
    lease.mark_queued()
    lease.synchronize()
    lease.synchronize()
    lease.release()
    assert pool.lease(8).buffer.data_ptr() == lease.buffer.data_ptr()  # idle: reused at once
    assert FakeEvent.log == ["record", "wait"]


def test_packing_keeps_every_piece_aligned_and_distinct() -> None:
    pieces = [torch.arange(3, dtype=torch.int64), torch.tensor([1.5], dtype=torch.float32),
              torch.zeros(0, dtype=torch.int32), torch.arange(5, dtype=torch.int16).view(5, 1)]
    offsets, total = packed_offsets([p.numel() * p.element_size() for p in pieces])
    assert offsets == [0, 32, 48, 48] and all(o % ALIGN == 0 for o in offsets) and total == 64
    buffer = torch.zeros(total, dtype=torch.uint8)
    views = [byte_view(buffer, o, p).copy_(p) for o, p in zip(offsets, pieces, strict=True)]
    for piece, view in zip(pieces, views, strict=True):
        assert view.dtype == piece.dtype and view.shape == piece.shape and torch.equal(view, piece)
    assert buffer[offsets[1]:offsets[1] + 4].view(torch.float32).item() == 1.5


def test_page_locked_memory_off_cuda_is_plain_host_memory() -> None:
    buffer = page_locked_empty(100, "cpu")
    assert buffer.shape == (100,) and buffer.dtype == torch.uint8 and buffer.device.type == "cpu"
    assert page_locked_empty(0, "cuda").numel() == 0
