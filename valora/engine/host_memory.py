"""Page-locked host memory that a device fault cannot turn into a process abort.

Non-blocking copies between the host and a CUDA device need page-locked host memory. PyTorch's
own (``pin_memory()``, ``torch.empty(..., pin_memory=True)``) comes from its caching host
allocator, which, when a block that served a non-blocking copy is freed, creates and records a
CUDA event *inside the tensor's deleter*. After a sticky device error (a device-side assert in a
kernel) that event cannot be created, the deleter throws where no exception may pass, and the
process aborts (``terminate called after throwing an instance of 'c10::AcceleratorError'``; seen
on an H200 by ``tests/gpu/test_device_fault_cuda.py``: the engine never got to report itself
dead). So valora's per-step transfers take page-locked memory from here instead:

* ``page_locked_empty`` registers ordinary host memory with ``cudaHostRegister``. Copies from and
  to it are as asynchronous as from pinned memory, but PyTorch's allocator does not know it
  (``CachingHostAllocator_recordEvent`` ignores pointers it did not allocate), so freeing it
  never touches the device; ``cudaHostUnregister``'s error, once the context is dead, is ignored.
  Registration costs far more than a cached pinned block, so only the staging pool's few,
  long-lived buffers are registered.
* ``StagingPool`` hands out reusable buffers for the per-step transfers (the step's metadata
  upload, the sampled tokens' download). A lease records an event once its copies are queued
  (``mark_queued``); a buffer is handed out again only after that event completed, so the host
  never writes a buffer a queued copy still reads, nor reads one a queued copy still writes.

Not here: adapters' host copies (``SlotPrefetcher.pin``) and host pristine weight copies stay
in PyTorch's pinned memory. Registering each adapter's copy cost ≈ 30–40 ms more per 7B-shaped
adapter load on an H200 (``bench/results/model/host-staging-ab-h200-fab2eac/``), and those
copies are freed only on eviction, on unmerge or at exit, never per step; after a device fault
the dead engine, and so every such copy, is kept until the process ends
(``valora.engine.faults.retain_for_process``), so none is freed against the dead context.

Invariants: a buffer is leased to at most one holder; a lease released (or dropped) without
``mark_queued`` had no device work queued on it; the pool holds at most ``max_buffers`` buffers
(more only while more are leased at once). A lease prefers a buffer whose copies already ran
(the event is queried, not waited on), so preparing the next step never waits for the one in
flight.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

PAGE = 4096
ALIGN = 16
"""Byte alignment of each piece packed into one buffer (the sampler's download): every dtype's
views stay aligned."""
MIN_STAGING_BYTES = 64 << 10


def _unregister(pointer: int) -> None:
    # The error code is ignored: with a dead context the memory goes with the process anyway.
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(pointer)


def page_locked_empty(nbytes: int, device: torch.device | str = "cuda") -> torch.Tensor:
    """A ``[nbytes]`` ``uint8`` host tensor, page-aligned and, for a CUDA ``device``, page-locked
    by ``cudaHostRegister`` (outside PyTorch's caching host allocator: module docstring). It is
    unregistered when the last view of it is freed. For another device: ordinary memory."""
    if torch.device(device).type != "cuda" or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // PAGE) * PAGE
    raw = np.empty(size + PAGE, dtype=np.uint8)
    offset = (-raw.ctypes.data) % PAGE
    aligned = raw[offset:offset + size]
    pointer = int(aligned.ctypes.data)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(pointer, size, 0))
    finalizer = weakref.finalize(aligned, _unregister, pointer)
    finalizer.atexit = False  # at exit the process's memory goes without a CUDA call
    return torch.from_numpy(aligned)[:nbytes]


def packed_offsets(nbytes: Sequence[int]) -> tuple[list[int], int]:
    """Byte offsets of pieces of ``nbytes`` packed back to back, each ``ALIGN``-aligned, and the
    total size."""
    offsets, end = [], 0
    for size in nbytes:
        offsets.append(end)
        end += -(-size // ALIGN) * ALIGN
    return offsets, end


def byte_view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The part of ``uint8`` ``buffer`` from ``offset`` viewed as a tensor of ``like``'s dtype and
    shape (``offset`` a multiple of the dtype's size)."""
    size = like.numel() * like.element_size()
    return buffer[offset:offset + size].view(like.dtype).view(like.shape)


class DeviceEvent(Protocol):
    """What the pool needs of ``torch.cuda.Event``."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class _Buffer:
    data: torch.Tensor
    event: DeviceEvent | None = None
    queued: bool = False
    leased: bool = False


class Staging:
    """One lease of a pool buffer: ``buffer`` is a ``uint8`` view of the requested size."""

    def __init__(self, pool: StagingPool, entry: _Buffer, nbytes: int) -> None:
        self.buffer = entry.data[:nbytes]
        self._entry = entry
        self._pool = pool
        self._return = weakref.finalize(self, pool._give_back, entry)

    def mark_queued(self) -> None:
        """Every device copy from or to ``buffer`` is queued on the current stream: record an
        event after them."""
        entry = self._entry
        if entry.event is None:
            entry.event = self._pool.make_event()
        entry.event.record()
        entry.queued = True

    def synchronize(self) -> None:
        """Wait for the copies queued before ``mark_queued`` (not for later work)."""
        if self._entry.queued and self._entry.event is not None:
            self._entry.event.synchronize()
            self._entry.queued = False

    def release(self) -> None:
        """Give the buffer back (idempotent; dropping the lease does the same). It is handed out
        again once the queued copies completed."""
        self._return()


class StagingPool:
    """Reusable page-locked buffers for per-step transfers (module docstring). ``allocate(n)``
    returns an ``n``-byte ``uint8`` host tensor; ``make_event`` a device event."""

    def __init__(self, allocate: Callable[[int], torch.Tensor],
                 make_event: Callable[[], DeviceEvent], max_buffers: int = 16) -> None:
        self._allocate = allocate
        self.max_buffers = max_buffers
        self.make_event = make_event
        self._buffers: list[_Buffer] = []
        self._lock = threading.Lock()

    @property
    def num_buffers(self) -> int:
        return len(self._buffers)

    @property
    def capacity_bytes(self) -> int:
        return sum(b.data.numel() for b in self._buffers)

    def lease(self, nbytes: int) -> Staging:
        """A buffer of at least ``nbytes`` no queued copy still uses, without waiting where
        possible: the smallest free one that fits and whose copies completed (event queried);
        else, below ``max_buffers``, a new one; else the smallest free one that fits (waiting
        for its copies), or a larger one in place of the smallest free one. Waiting on a buffer
        whose copy is queued behind the step in flight would stall the host until that step
        ends, undoing asynchronous scheduling (measured: up to 25 % longer steps)."""
        with self._lock:
            free = sorted((b for b in self._buffers if not b.leased), key=lambda b: b.data.numel())
            fits = [b for b in free if b.data.numel() >= nbytes]
            entry = next((b for b in fits if self._idle(b)), None)
            if entry is None and (len(self._buffers) >= self.max_buffers and free):
                entry = fits[0] if fits else None
                if entry is None:
                    self._wait(free[0])
                    self._buffers.remove(free[0])
            if entry is None:
                size = max(MIN_STAGING_BYTES, 1 << max(0, nbytes - 1).bit_length())
                entry = _Buffer(self._allocate(size))
                self._buffers.append(entry)
            self._wait(entry)
            entry.leased = True
        return Staging(self, entry, nbytes)

    @staticmethod
    def _idle(entry: _Buffer) -> bool:
        if entry.queued and entry.event is not None and not entry.event.query():
            return False
        entry.queued = False
        return True

    @staticmethod
    def _wait(entry: _Buffer) -> None:
        if entry.queued and entry.event is not None:
            entry.event.synchronize()
        entry.queued = False

    def _give_back(self, entry: _Buffer) -> None:
        with self._lock:
            entry.leased = False


_POOLS: dict[torch.device, StagingPool] = {}
_POOLS_LOCK = threading.Lock()


def staging_pool(device: torch.device) -> StagingPool:
    """The process's staging pool for CUDA ``device`` (one per device)."""
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    with _POOLS_LOCK:
        pool = _POOLS.get(device)
        if pool is None:
            pool = StagingPool(lambda n: page_locked_empty(n, device), torch.cuda.Event)
            _POOLS[device] = pool
        return pool
