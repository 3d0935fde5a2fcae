"""Adapter registry, host (CPU) cache and resident slots.

Three tiers, each bounded:

- **registry**: every adapter known by name (path, digest, rank). Registration validates the
  adapter eagerly, so a bad directory fails at ``register`` and never inside a step.
- **host cache**: up to ``max_cpu_loras`` decoded adapters, least-recently-used evicted; an
  evicted adapter is re-read from disk on next use and must still have its registered digest.
  Adapters registered with ``pinned=True`` (``valora serve --lora-modules``, bundled adapters)
  stay decoded here until unregistered and do not count toward the bound: other adapters' loads,
  unloads and traffic never evict them, and their weights are never re-read from disk.
- **slots**: ``max_loras`` resident adapters whose weights sit in every LoRA-aware linear's
  :class:`LoRASlotWeights`. ``acquire`` pins an adapter in a slot (pin counts: many requests
  may share one); only unpinned residents are evicted, least-recently-used first.

Slot writes are done by a :class:`~valora.lora.slot_writer.SlotWriter` through a
:class:`SlotPrefetcher`: host copies of cached adapters are pinned
(in the slot dtype) and copied into the slot on a side CUDA stream, so a slot fills while the
request still waits in the queue; the ticket of each write is kept per slot and the runner calls
``wait_for_slots`` with the slots of a step before launching it (a stream-ordered wait, no host
synchronisation). On the CPU the copies are synchronous. A failed write raises
:class:`AdapterPrefetchError` from ``acquire``, which fails only the request being admitted.

Invariants (``check_invariants``): a slot holds at most one adapter and an adapter at most one
slot; pinned adapters are resident; pins are never negative; the host cache is within bound
(unpinned entries at most ``max_cpu_loras``) and holds every registry-pinned adapter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from valora.config import LoRAConfig
from valora.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    ValoraError,
)
from valora.logger import get_logger
from valora.lora.adapter import LoRAAdapter
from valora.lora.peft_format import load_peft_adapter
from valora.lora.shapes import BaseModelShapes
from valora.lora.slot_writer import SlotMap, SlotWriter

logger = get_logger(__name__)

Residency = Literal["device", "cpu", "none"]


class AdapterPrefetchError(ValoraError):
    """Copying an adapter's weights into a device slot failed (the slot is left empty)."""


@dataclass
class _Registration:
    name: str
    path: Path
    digest: str
    rank: int
    nbytes: int
    target_modules: tuple[str, ...]
    pins: int = 0
    slot: int | None = None
    pinned: bool = False


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter as ``list_adapters`` reports it."""

    name: str
    path: str
    rank: int
    digest: str
    residency: Residency
    pin_count: int
    slot: int | None
    nbytes: int
    target_modules: tuple[str, ...]
    pinned: bool = False
    """Registered with ``pinned=True``: kept in the host cache until unregistered."""


@dataclass(frozen=True)
class AdapterManagerStats:
    """Counts of the three tiers plus lifetime counters of loads and evictions."""

    num_registered: int
    num_resident: int
    num_pinned: int
    num_free_slots: int
    num_cpu_cached: int
    slot_loads: int
    slot_evictions: int
    disk_loads: int
    cpu_evictions: int


class AdapterManager:
    """Owns adapter identity and residency; the engine is its only user.

    ``slot_map`` comes from ``model.lora_slot_map()``; slots ``0 .. max_loras-1`` of every entry
    are managed here. An empty map means LoRA is disabled: there are no slots and ``register``
    fails. All methods are thread-safe (one lock); disk reads in ``register`` happen outside it.
    """

    def __init__(self, slot_map: SlotMap, lora_config: LoRAConfig, base: BaseModelShapes) -> None:
        self._slot_map = dict(slot_map)
        self._config = lora_config
        self._base = base
        self._max_rank = min([lora_config.max_lora_rank]
                             + [w.max_rank for w, _ in self._slot_map.values()])
        self._writer = SlotWriter(self._slot_map, base, lora_config.max_loras)
        self._registry: dict[str, _Registration] = {}
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        num_slots = lora_config.max_loras if self._slot_map else 0
        self._slot_owner: list[str | None] = [None] * num_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # resident slots, oldest first
        self._lock = threading.RLock()
        self._counters = {"slot_loads": 0, "slot_evictions": 0, "disk_loads": 0,
                          "cpu_evictions": 0}

    # ---------------------------------------------------------------- registry
    def register(self, name: str, path: str | Path, *, pinned: bool = False) -> LoRAAdapter:
        """Validate and decode the adapter at ``path`` and register it under ``name``.

        ``pinned``: keep the decoded adapter in the host cache until ``unregister`` (never
        evicted by other adapters' traffic, never re-read from disk).

        Raises :class:`InvalidAdapterError` for a bad adapter, a rank above the slot rank, a
        module the model does not expose, or a name already registered (unregister it first).
        """
        with self._lock:
            if name in self._registry:
                raise InvalidAdapterError(
                    f"adapter name {name!r} is already registered (from "
                    f"{self._registry[name].path}); unregister it first")
        adapter = self._read(name, Path(path))
        with self._lock:
            self._counters["disk_loads"] += 1
            if name in self._registry:
                raise InvalidAdapterError(f"adapter name {name!r} is already registered")
            self._registry[name] = _Registration(
                name=name, path=adapter.path, digest=adapter.digest, rank=adapter.rank,
                nbytes=adapter.nbytes, target_modules=adapter.target_modules, pinned=pinned)
            self._cache(adapter)
            logger.info("registered adapter %s (rank %d, digest %s) from %s",
                        name, adapter.rank, adapter.digest[:12], adapter.path)
            return adapter

    def unregister(self, name: str) -> None:
        """Forget ``name``; frees its slot. Fails while any request holds a pin on it."""
        with self._lock:
            registration = self._lookup(name)
            if registration.pins > 0:
                raise InvalidRequestError(
                    f"adapter {name!r} is in use by {registration.pins} running request(s); "
                    f"unregister it after they finish")
            if registration.slot is not None:
                self._vacate(registration.slot, clear=True)
            self._host.pop(name, None)
            self._writer.forget(name)
            del self._registry[name]

    def resolve(self, name: str) -> LoRAAdapter:
        """The decoded adapter (from the host cache, else re-read from disk)."""
        with self._lock:
            return self._host_adapter(self._lookup(name))

    def digest(self, name: str) -> str:
        with self._lock:
            return self._lookup(name).digest

    def rank_of(self, name: str) -> int:
        with self._lock:
            return self._lookup(name).rank

    def path_of(self, name: str) -> Path:
        """The directory ``name`` was registered from (task heads live there too)."""
        with self._lock:
            return self._lookup(name).path

    # ------------------------------------------------------------------- slots
    def acquire(self, name: str) -> int | None:
        """Pin ``name`` in a slot and return the slot, or ``None`` if every slot is pinned by
        other adapters (the caller waits). Loads into a free slot, else evicts the
        least-recently-used unpinned resident."""
        with self._lock:
            registration = self._lookup(name)
            if registration.slot is None:
                slot = self._free_or_victim_slot()
                if slot is None:
                    return None
                adapter = self._host_adapter(registration)  # may raise: nothing evicted yet
                if self._slot_owner[slot] is not None:
                    self._vacate(slot, clear=False)
                    self._counters["slot_evictions"] += 1
                try:
                    self._writer.write(slot, adapter, keep_sources=name in self._host)
                except (ValoraError, RuntimeError) as exc:  # pinning or a copy failed
                    self._writer.discard(slot)
                    raise AdapterPrefetchError(
                        f"adapter {name!r} could not be copied into device slot {slot}: {exc}"
                    ) from exc
                self._slot_owner[slot] = name
                self._slot_lru[slot] = None
                registration.slot = slot
                self._counters["slot_loads"] += 1
            registration.pins += 1
            self._slot_lru.move_to_end(registration.slot)
            return registration.slot

    def release(self, name: str) -> None:
        """Drop one pin taken by ``acquire``; the adapter stays resident until evicted."""
        with self._lock:
            registration = self._lookup(name)
            if registration.pins <= 0 or registration.slot is None:
                raise ValoraError(f"release({name!r}) without a matching acquire")
            registration.pins -= 1
            self._slot_lru.move_to_end(registration.slot)

    def wait_for_slots(self, slots: Iterable[int]) -> None:
        """Order the current stream after the pending writes of ``slots`` (negative slots and
        slots without a pending write are ignored). No host synchronisation."""
        with self._lock:
            self._writer.wait(slots)

    def pending_slot_writes(self) -> list[int]:
        """Slots whose last write may still be in flight (tests, stats)."""
        with self._lock:
            return self._writer.pending()

    def slot_of(self, name: str) -> int | None:
        with self._lock:
            return self._lookup(name).slot

    def residency(self, name: str) -> Residency:
        with self._lock:
            registration = self._lookup(name)
            if registration.slot is not None:
                return "device"
            return "cpu" if name in self._host else "none"

    def pin_count(self, name: str) -> int:
        with self._lock:
            return self._lookup(name).pins

    @property
    def num_slots(self) -> int:
        return len(self._slot_owner)

    @property
    def max_rank(self) -> int:
        """Largest adapter rank the slots can hold."""
        return self._max_rank

    def list_adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [AdapterInfo(name=r.name, path=str(r.path), rank=r.rank, digest=r.digest,
                                residency=self.residency(r.name), pin_count=r.pins, slot=r.slot,
                                nbytes=r.nbytes, target_modules=r.target_modules,
                                pinned=r.pinned)
                    for r in sorted(self._registry.values(), key=lambda r: r.name)]

    def stats(self) -> AdapterManagerStats:
        with self._lock:
            resident = [n for n in self._slot_owner if n is not None]
            return AdapterManagerStats(
                num_registered=len(self._registry), num_resident=len(resident),
                num_pinned=sum(1 for n in resident if self._registry[n].pins > 0),
                num_free_slots=self.num_slots - len(resident), num_cpu_cached=len(self._host),
                **self._counters)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` naming the first inconsistency in the bookkeeping."""
        with self._lock:
            owners = [n for n in self._slot_owner if n is not None]
            _expect(len(owners) == len(set(owners)), f"adapter in two slots: {self._slot_owner}")
            _expect(set(self._slot_lru) == {s for s, n in enumerate(self._slot_owner) if n},
                    "LRU order disagrees with slot owners")
            for slot, owner in enumerate(self._slot_owner):
                _expect(owner is None or self._registry[owner].slot == slot,
                        f"slot {slot} owner {owner!r} does not point back at it")
            for r in self._registry.values():
                _expect(r.pins >= 0, f"{r.name} has negative pins")
                _expect(r.pins == 0 or r.slot is not None, f"{r.name} pinned but not resident")
                _expect(r.slot is None or self._slot_owner[r.slot] == r.name,
                        f"{r.name} claims slot {r.slot} owned by another adapter")
            unpinned = [n for n in self._host if n in self._registry
                        and not self._registry[n].pinned]
            _expect(len(unpinned) <= self._config.max_cpu_loras, "host cache over bound")
            _expect(all(n in self._host for n, r in self._registry.items() if r.pinned),
                    "a pinned adapter left the host cache")
            _expect(set(self._host) <= set(self._registry), "host cache holds unknown adapter")

    # ------------------------------------------------------------- internals
    def _lookup(self, name: str) -> _Registration:
        registration = self._registry.get(name)
        if registration is None:
            known = ", ".join(sorted(self._registry)) or "none"
            raise AdapterNotFoundError(
                f"adapter {name!r} is not registered; known adapters: {known}")
        return registration

    def _read(self, name: str, path: Path) -> LoRAAdapter:
        if not self._slot_map:
            raise InvalidAdapterError(f"cannot register adapter {name!r}: LoRA is disabled for "
                                      f"this engine (start it with enable_lora=True)")
        adapter = load_peft_adapter(name, path, self._base, max_rank=self._max_rank)
        unexposed = sorted(k for k in adapter.modules if k not in self._slot_map)
        if unexposed:
            raise InvalidAdapterError(f"adapter {name!r} targets {unexposed[:4]} which the model "
                                      f"does not expose as LoRA-aware linears")
        return adapter

    def _host_adapter(self, registration: _Registration) -> LoRAAdapter:
        adapter = self._host.get(registration.name)
        if adapter is not None:
            self._host.move_to_end(registration.name)
            return adapter
        adapter = self._read(registration.name, registration.path)
        self._counters["disk_loads"] += 1
        if adapter.digest != registration.digest:
            raise InvalidAdapterError(
                f"adapter {registration.name!r} changed on disk since registration (digest "
                f"{registration.digest[:12]} -> {adapter.digest[:12]}); re-register it")
        self._cache(adapter)
        return adapter

    def _cache(self, adapter: LoRAAdapter) -> None:
        self._host[adapter.name] = adapter
        self._host.move_to_end(adapter.name)
        unpinned = [n for n in self._host if not self._registry[n].pinned]  # oldest first
        for evicted in unpinned[:max(0, len(unpinned) - self._config.max_cpu_loras)]:
            del self._host[evicted]
            self._writer.forget(evicted)
            self._counters["cpu_evictions"] += 1
            logger.debug("host cache evicted adapter %s", evicted)

    def _free_or_victim_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None:
                return slot
        for slot in self._slot_lru:
            owner = self._slot_owner[slot]
            if owner is not None and self._registry[owner].pins == 0:
                return slot
        return None

    def _vacate(self, slot: int, clear: bool) -> None:
        owner = self._slot_owner[slot]
        if owner is not None:
            self._registry[owner].slot = None
        self._slot_owner[slot] = None
        self._slot_lru.pop(slot, None)
        if clear:
            self._writer.write(slot, None)

def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
