"""What a mode policy sees (an immutable snapshot of the queues) and what it returns.

Time is the caller's clock in seconds (``time.monotonic`` in the engine, simulated time in the
simulator); policies never read a clock themselves, so they are pure functions of their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from valora.orchestrator.modes import Mode
from valora.request import Request


@dataclass(frozen=True)
class RequestView:
    """One request as a policy sees it.

    ``prompt_tokens_remaining``: prompt tokens without K/V yet. ``output_tokens_remaining``: an
    upper estimate of tokens still to generate (``max_tokens`` minus generated). ``context_tokens``:
    tokens whose K/V exist. ``last_progress_time``: end of the last step that ran it (``None`` =
    never, or preempted since); a request's *wait* is the time since then, or since arrival.
    """

    request_id: str
    adapter: str | None
    rank: int
    arrival_time: float
    prompt_tokens_remaining: int
    output_tokens_remaining: int
    context_tokens: int = 0
    latency_target_s: float | None = None
    last_progress_time: float | None = None

    @property
    def tokens_remaining(self) -> int:
        return self.prompt_tokens_remaining + self.output_tokens_remaining

    def wait_s(self, now: float) -> float:
        """Seconds since this request last made progress (or arrived)."""
        since = self.last_progress_time
        if since is None:
            since = self.arrival_time
        return max(0.0, now - since)

    @classmethod
    def from_request(cls, request: Request, rank: int,
                     last_progress_time: float | None = None) -> RequestView:
        """Snapshot an engine request; ``rank`` is its adapter's rank (0 for the base model).

        ``last_progress_time`` is tracked by the engine (``Request`` only keeps the first one).
        """
        prompt_left = max(0, request.num_prompt_tokens - request.num_computed_tokens)
        output_left = max(1, request.sampling_params.max_tokens - request.num_output_tokens)
        return cls(request.request_id, request.adapter_name, rank, request.arrival_time,
                   prompt_left, output_left, request.num_computed_tokens,
                   request.latency_target_s, last_progress_time)


@dataclass(frozen=True)
class AdapterInfo:
    """A mergeable adapter: its rank (largest over its modules) and the weight bytes one merge or
    unmerge of it reads and writes (``WeightSwitcher.affected_bytes``)."""

    rank: int
    merge_bytes: int


@dataclass(frozen=True)
class QueueView:
    """Running and waiting requests (waiting in arrival order) and the room left this step.

    ``free_seats``: how many waiting requests may be admitted now (sequence and KV limits already
    applied by the engine). ``token_budget``: tokens one step may compute. ``max_active_adapters``:
    distinct adapters one step may use (``None`` = no limit). ``adapters``: the adapters that may be
    merged (resident, mergeable) with rank and switch bytes; others are only served unmerged.
    """

    running: tuple[RequestView, ...]
    waiting: tuple[RequestView, ...]
    free_seats: int
    token_budget: int = 2048
    max_active_adapters: int | None = None
    adapters: Mapping[str, AdapterInfo] = field(default_factory=dict)

    @property
    def all_requests(self) -> tuple[RequestView, ...]:
        return self.running + self.waiting

    def by_id(self) -> dict[str, RequestView]:
        return {r.request_id: r for r in self.all_requests}

    def demand(self) -> dict[str | None, int]:
        """Requests per adapter over running + waiting (``None`` = base model)."""
        counts: dict[str | None, int] = {}
        for request in self.all_requests:
            counts[request.adapter] = counts.get(request.adapter, 0) + 1
        return counts


@dataclass(frozen=True)
class ModeDecision:
    """A policy's answer for the next step.

    ``admitted``: waiting request ids to start now, in priority order. ``deferred``: running
    request ids that sit this step out (they keep their KV pages). The step runs
    ``running − deferred + admitted``; in ``MERGED`` mode all of them belong to
    ``merged_adapter``. ``merged_adapter`` is ``None`` exactly in ``UNMERGED`` mode.
    """

    mode: Mode
    merged_adapter: str | None
    admitted: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()

    def scheduled(self, view: QueueView) -> list[RequestView]:
        """The requests this decision runs, running ones first."""
        deferred = set(self.deferred)
        by_id = view.by_id()
        return ([r for r in view.running if r.request_id not in deferred]
                + [by_id[i] for i in self.admitted])


def views_from_requests(
    requests: Sequence[Request],
    ranks: Mapping[str, int],
    last_progress: Mapping[str, float] | None = None,
) -> tuple[RequestView, ...]:
    """Snapshot engine requests; ``ranks``: adapter name -> rank; ``last_progress``: request id
    -> end of the last step that ran it."""
    last = last_progress or {}
    return tuple(RequestView.from_request(r, ranks.get(r.adapter_name, 0) if r.adapter_name else 0,
                                          last.get(r.request_id)) for r in requests)
