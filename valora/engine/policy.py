"""Scheduling policies: which waiting request goes next, which running request is preempted.

Mechanism (token budget, pages, preemption by recompute) lives in ``scheduler.py``; a policy only
orders. Policies implement ``SchedulingPolicy`` and are chosen by name from a registry
(``get_policy``); latency-aware policies register themselves with ``register_policy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from valora.errors import InvalidRequestError
from valora.request import Request


@runtime_checkable
class SchedulingPolicy(Protocol):
    """Ordering decisions of the scheduler.

    - ``order_waiting(waiting, now)``: the waiting requests in the order the scheduler should try
      to admit them (a permutation of ``waiting``; ``now`` is ``time.monotonic()``). ``waiting``
      is in queue order: preempted requests at the front, then arrivals.
    - ``choose_victim(running)``: the running request to preempt when pages run out; ``running``
      is non-empty and in scheduling order. It may be the request being scheduled.
    """

    name: str

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]: ...

    def choose_victim(self, running: Sequence[Request]) -> Request: ...


class FCFSPolicy:
    """First come, first served: admit by arrival time; preempt the latest arrival.

    Ties (equal arrival times) keep queue order, so a preempted request stays ahead of requests
    that arrived with it. Preempting the newest request first means the oldest one always
    progresses, so every request finishes (no starvation) when it fits the pool alone.
    """

    name = "fcfs"

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return sorted(waiting, key=lambda request: request.arrival_time)

    def choose_victim(self, running: Sequence[Request]) -> Request:
        if not running:
            raise ValueError("choose_victim needs at least one running request")
        victim = running[-1]
        for request in reversed(running):
            if request.arrival_time > victim.arrival_time:
                victim = request
        return victim


PolicyFactory = Callable[[], SchedulingPolicy]

_POLICIES: dict[str, PolicyFactory] = {"fcfs": FCFSPolicy}


def register_policy(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``get_policy(name)``; refuses to shadow a name silently."""
    if name in _POLICIES and not replace:
        raise ValueError(f"scheduling policy {name!r} is already registered")
    _POLICIES[name] = factory


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def get_policy(name: str) -> SchedulingPolicy:
    """A fresh instance of the policy registered as ``name``."""
    factory = _POLICIES.get(name)
    if factory is None:
        raise InvalidRequestError(
            f"unknown scheduling policy {name!r}; available: {', '.join(available_policies())}"
        )
    return factory()
