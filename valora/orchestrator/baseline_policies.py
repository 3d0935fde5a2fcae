"""Baseline mode policies the serving benchmark compares valora against.

All three are pure and stateless; see ``policies`` for the protocol. ``starvation_s`` (optional on
``dlora`` and ``merged-only``) gives them the same no-starvation guarantee valora has, so the
comparison measures mode choice rather than unbounded waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from valora.errors import InvalidRequestError
from valora.orchestrator.modes import Mode, ModeState
from valora.orchestrator.policies import admit, by_arrival, runnable, serve_only, starving
from valora.orchestrator.queue_view import ModeDecision, QueueView, RequestView


@dataclass(frozen=True)
class UnmergedFCFSPolicy:
    """Always unmerged; admit waiting requests in arrival order (S-LoRA / Punica)."""

    name: str = "unmerged-fcfs"

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        admitted = admit(by_arrival(view.waiting), view, view.running)
        return ModeDecision(Mode.UNMERGED, None, admitted)


@dataclass(frozen=True)
class DLoRAPolicy:
    """dLoRA-style switching: merge the top adapter when its share of requests (running +
    waiting) exceeds ``alpha``; unmerge when the merged adapter's share drops below ``beta`` or a
    request of another adapter reaches ``starvation_s``. Never mixed: while merged, only the
    merged adapter's requests run (others wait or sit out)."""

    alpha: float = 0.6
    beta: float = 0.4
    starvation_s: float | None = None
    name: str = "dlora"

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= self.alpha <= 1.0:
            raise InvalidRequestError(
                f"dlora needs 0 <= beta <= alpha <= 1, got beta={self.beta}, alpha={self.alpha}")

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        demand = view.demand()
        total = sum(demand.values())
        order = by_arrival(view.waiting)
        target = state.merged_adapter if state.mode.has_merged_adapter else None
        if target is None:
            adapters = {a: n for a, n in demand.items()
                        if a is not None and a in view.adapters}
            if adapters and total:
                top = max(sorted(adapters, key=str), key=lambda a: adapters[a])
                if adapters[top] / total > self.alpha and not self._others_starving(view, top, now):
                    target = top
        elif total and (demand.get(target, 0) / total < self.beta
                        or self._others_starving(view, target, now)
                        or not any(r.adapter == target for r in runnable(view))):
            target = None
        if target is None:
            return ModeDecision(Mode.UNMERGED, None, admit(order, view, view.running))
        admitted, deferred = serve_only(view, target, order)
        return ModeDecision(Mode.MERGED, target, admitted, deferred)

    def _others_starving(self, view: QueueView, adapter: str, now: float) -> bool:
        others = (r for r in view.all_requests if r.adapter != adapter)
        return bool(starving(others, now, self.starvation_s))


@dataclass(frozen=True)
class MergedOnlyPolicy:
    """Always merged on one adapter, serving only its requests until its queue (running +
    waiting) drains, then the adapter of the oldest request; a request reaching ``starvation_s``
    forces a switch to its adapter. Only *runnable* requests count (running, or waiting while a
    seat is free), so seats full of other adapters' requests never stall it. Base-model requests
    are served unmerged, alone."""

    starvation_s: float | None = None
    name: str = "merged-only"

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        current = state.merged_adapter if state.mode.has_merged_adapter else None
        pending = runnable(view)
        if not pending:
            return ModeDecision(state.mode, state.merged_adapter)
        late = [r for r in starving(pending, now, self.starvation_s) if r.adapter != current]
        target = current
        if late:
            target = late[0].adapter
        elif not any(r.adapter == current for r in pending):
            target = _oldest(pending).adapter
        if target is not None and target not in view.adapters:
            target = None  # cannot be merged: serve it unmerged, alone
        admitted, deferred = serve_only(view, target, by_arrival(view.waiting))
        if target is None:
            return ModeDecision(Mode.UNMERGED, None, admitted, deferred)
        return ModeDecision(Mode.MERGED, target, admitted, deferred)


def _oldest(requests: list[RequestView]) -> RequestView:
    return min(requests, key=lambda r: (r.arrival_time, r.request_id))
