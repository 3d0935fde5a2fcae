"""Mode policies: the ``ModePolicy`` protocol, a registry, and helpers every policy shares.

A policy is a pure function of ``(QueueView, ModeState, now)``: same inputs, same decision; it
keeps no mutable state between calls (``ModeState.since`` carries what hysteresis needs).
Built-in policies (``available_mode_policies()``):

- ``unmerged-fcfs``: S-LoRA / Punica style, always unmerged, first come first served.
- ``dlora``: merged while the top adapter's share of requests exceeds ``alpha`` (back to unmerged
  below ``beta``); no mixed mode; while merged only that adapter's requests run.
- ``merged-only``: always merged on the oldest request's adapter until its queue drains or the
  starvation bound forces a switch.
- ``valora``: cost-model driven choice among unmerged / merged(m) / mixed(m) (``valora_policy``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from valora.errors import InvalidRequestError
from valora.orchestrator.modes import ModeState
from valora.orchestrator.queue_view import ModeDecision, QueueView, RequestView


class ModePolicy(Protocol):
    """Chooses the next step's mode, merged adapter, admissions and deferrals."""

    @property
    def name(self) -> str:
        """The registry name."""
        ...

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision: ...


PolicyFactory = Callable[..., ModePolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_mode_policy(name: str, factory: PolicyFactory) -> None:
    """Make ``factory(**options)`` available as ``get_mode_policy(name, **options)``."""
    _REGISTRY[name] = factory


def available_mode_policies() -> list[str]:
    _ensure_builtin_policies()
    return sorted(_REGISTRY)


def get_mode_policy(name: str, **options: object) -> ModePolicy:
    """Build the policy registered as ``name`` with its options (e.g. ``cost_model=...``)."""
    _ensure_builtin_policies()
    if name not in _REGISTRY:
        raise InvalidRequestError(
            f"unknown mode policy {name!r}; available: {available_mode_policies()}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as exc:
        raise InvalidRequestError(f"bad options for mode policy {name!r}: {exc}") from exc


def _ensure_builtin_policies() -> None:
    if "valora" not in _REGISTRY:
        from valora.orchestrator.baseline_policies import (
            DLoRAPolicy,
            MergedOnlyPolicy,
            UnmergedFCFSPolicy,
        )
        from valora.orchestrator.valora_policy import ValoraPolicy

        register_mode_policy("unmerged-fcfs", UnmergedFCFSPolicy)
        register_mode_policy("dlora", DLoRAPolicy)
        register_mode_policy("merged-only", MergedOnlyPolicy)
        register_mode_policy("valora", ValoraPolicy)


def admit(
    candidates: Iterable[RequestView],
    view: QueueView,
    kept_running: Sequence[RequestView],
) -> tuple[str, ...]:
    """Take ``candidates`` in order while seats last, skipping requests whose adapter would push
    the step past ``view.max_active_adapters`` (``kept_running``: running requests that run)."""
    adapters = {r.adapter for r in kept_running if r.adapter is not None}
    admitted: list[str] = []
    for request in candidates:
        if len(admitted) >= view.free_seats:
            break
        limit = view.max_active_adapters
        if (request.adapter is not None and limit is not None and request.adapter not in adapters
                and len(adapters) >= limit):
            continue
        if request.adapter is not None:
            adapters.add(request.adapter)
        admitted.append(request.request_id)
    return tuple(admitted)


def starving(requests: Iterable[RequestView], now: float, bound_s: float | None,
             guard_s: float = 0.0) -> list[RequestView]:
    """Requests whose wait reaches ``bound_s - guard_s`` (longest wait first); none if no bound."""
    if bound_s is None:
        return []
    late = [r for r in requests if r.wait_s(now) + guard_s >= bound_s]
    return sorted(late, key=lambda r: -r.wait_s(now))


def serve_only(view: QueueView, adapter: str | None, order: Sequence[RequestView]) -> tuple[
        tuple[str, ...], tuple[str, ...]]:
    """``(admitted, deferred)`` serving only ``adapter``'s requests (``None`` = base model)."""
    kept = [r for r in view.running if r.adapter == adapter]
    deferred = tuple(r.request_id for r in view.running if r.adapter != adapter)
    return admit((r for r in order if r.adapter == adapter), view, kept), deferred


def runnable(view: QueueView) -> list[RequestView]:
    """Requests that could run this step: running ones, and waiting ones while a seat is free."""
    return list(view.running) + (list(view.waiting) if view.free_seats > 0 else [])


def by_arrival(requests: Iterable[RequestView]) -> list[RequestView]:
    return sorted(requests, key=lambda r: (r.arrival_time, r.request_id))
