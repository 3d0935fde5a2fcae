"""Continuous batching under a token budget (no prefill/decode phases).

Each ``schedule()`` builds one step:

1. **Running requests**, in scheduling order: a decode takes one token, a request mid-prefill
   its next chunk (``min(remaining, budget)``). When pages run out, the policy picks a victim
   and it is *preempted by recompute*: its pages are freed, ``num_computed_tokens = 0``, and it
   goes back to the front of the waiting queue keeping its generated tokens (later recomputed
   over prompt + output). The victim may be the request being scheduled, or one already
   scheduled this step (its share of the budget is returned).
2. **Waiting requests**, in policy order, while the token budget and ``max_num_seqs`` allow and
   no preemption happened this step: prefix-cache lookup, pages for the new tokens, then
   ``admit`` (the engine pins an adapter slot). With chunked prefill a prompt takes what is left
   of the budget; without it a prompt waits until it fits whole (a recompute larger than the
   whole budget is chunked anyway, or it could never run). A request that does not fit stops
   admission (FCFS: nothing overtakes it); a request ``admit`` refuses is skipped, and so are
   later requests of the same adapter, but other requests are still tried.

``advance(output)`` runs after the model step; the engine then appends sampled tokens and calls
``finish_request`` for requests that stopped. ``release`` is called exactly once each time a
request leaves the running set (finished, aborted, failed or preempted), so every ``admit`` that
returned True is matched by one ``release``.

Invariants: a request is in at most one of waiting/running; waiting requests hold no pages;
``len(running) <= max_num_seqs``; ``num_batched_tokens <= max_num_batched_tokens``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from valora.config import CacheConfig, SchedulerConfig
from valora.engine.policy import SchedulingPolicy, get_policy
from valora.engine.scheduler_output import ScheduledRequest, SchedulerOutput, is_prefill_step
from valora.errors import InvalidRequestError, OutOfResourcesError, QueueFullError
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.logger import get_logger
from valora.request import Request, RequestStatus

logger = get_logger(__name__)


class Scheduler:
    """Decides, step by step, which requests run and how many tokens each processes."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        kv_manager: KVCacheManager,
        *,
        max_model_len: int,
        policy: SchedulingPolicy | None = None,
        admit: Callable[[Request], bool] | None = None,
        release: Callable[[Request], object] | None = None,
    ) -> None:
        if cache_config.page_size != kv_manager.page_size:
            raise ValueError(
                f"cache_config.page_size ({cache_config.page_size}) differs from the "
                f"KV cache manager's page size ({kv_manager.page_size})"
            )
        self.config = scheduler_config
        self.cache_config = cache_config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.policy = policy if policy is not None else get_policy(scheduler_config.policy)
        self._admit = admit
        self._allow: Callable[[Request], bool] | None = None
        self._release = release
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}
        capacity = kv_manager.num_usable_pages * kv_manager.page_size
        if capacity < max_model_len:
            logger.warning(
                "KV cache holds %d tokens, less than max_model_len=%d: long requests are rejected",
                capacity,
                max_model_len,
            )

    # ------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or ``None``."""
        return self._requests.get(request_id)

    def running_requests(self) -> list[Request]:
        return list(self._running)

    def waiting_requests(self) -> list[Request]:
        return list(self._waiting)

    # ---------------------------------------------------------------- admission
    def add_request(self, request: Request) -> None:
        """Queue a new request; raises ``InvalidRequestError``, ``OutOfResourcesError`` or
        ``QueueFullError`` (in that order of checks) without queueing it."""
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if request.is_finished or request.num_computed_tokens != 0:
            raise InvalidRequestError(f"request {request.request_id!r} is not a fresh request")
        if request.num_prompt_tokens == 0:
            raise InvalidRequestError(f"request {request.request_id!r} has an empty prompt")
        budget = self.config.max_num_batched_tokens
        if not self.config.chunked_prefill and request.num_prompt_tokens > budget:
            raise InvalidRequestError(
                f"prompt of {request.num_prompt_tokens} tokens exceeds max_num_batched_tokens="
                f"{budget} with chunked prefill off; enable chunked_prefill or raise the budget"
            )
        # Tokens whose K/V may be stored: the last sampled token is never computed.
        max_len = request.num_prompt_tokens + request.sampling_params.max_tokens - 1
        max_len = max(request.num_prompt_tokens, min(max_len, self.max_model_len))
        if self.kv.pages_for_tokens(max_len) > self.kv.num_usable_pages:
            raise OutOfResourcesError(
                f"request {request.request_id!r} may need {self.kv.pages_for_tokens(max_len)} KV "
                f"pages ({max_len} tokens) but the cache has {self.kv.num_usable_pages}; shorten "
                f"the prompt or max_tokens, or give the KV cache more memory"
            )
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"waiting queue is full ({self.config.max_waiting} requests, "
                f"max_waiting); retry later"
            )
        request.status = RequestStatus.WAITING
        self._waiting.append(request)
        self._requests[request.request_id] = request

    # --------------------------------------------------------------- scheduling
    def schedule(self, allow: Callable[[Request], bool] | None = None) -> SchedulerOutput:
        """Plan one step (see the module docstring).

        ``allow`` (the mode orchestrator's decision) restricts this step to the requests it
        accepts: a running request it refuses sits the step out keeping its pages; a waiting one
        is skipped without blocking those behind it.
        """
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[Request] = []
        self._allow = allow
        budget = self._schedule_running(self.config.max_num_batched_tokens, scheduled, preempted)
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        self._allow = None
        items = list(scheduled.values())
        return SchedulerOutput(
            scheduled=items,
            preempted=preempted,
            num_batched_tokens=sum(item.num_new_tokens for item in items),
        )

    def _schedule_running(
        self, budget: int, scheduled: dict[str, ScheduledRequest], preempted: list[Request]
    ) -> int:
        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0 or (self._allow is not None and not self._allow(request)):
                # Nothing to compute (the engine has not appended a token); leave it for now.
                index += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.policy.choose_victim(self._running)
                victim_index = self._running.index(victim)
                del self._running[victim_index]
                dropped = scheduled.pop(victim.request_id, None)
                if dropped is not None:
                    budget += dropped.num_new_tokens
                self._preempt(victim)
                preempted.append(victim)
                if victim_index < index:
                    index -= 1
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = ScheduledRequest(
                    request, num_new, is_prefill=is_prefill_step(request)
                )
                budget -= num_new
                index += 1
        return budget

    def _schedule_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest]) -> None:
        if not self._waiting:
            return
        now = time.monotonic()
        started: set[str] = set()
        refused_adapters: set[str] = set()
        try:
            for request in self.policy.order_waiting(list(self._waiting), now):
                if budget <= 0 or len(self._running) >= self.config.max_num_seqs:
                    break
                if request.adapter_name is not None and request.adapter_name in refused_adapters:
                    continue
                if self._allow is not None and not self._allow(request):
                    continue
                request.num_computed_tokens = self.kv.get_computed_pages(request)
                num_new = self._num_new_waiting_tokens(request, budget)
                if num_new == 0 or not self.kv.allocate_slots(request, num_new):
                    self._undo_start(request)
                    break
                if self._admit is not None and not self._call_admit(self._admit, request):
                    self._undo_start(request)
                    if request.adapter_name is not None:
                        refused_adapters.add(request.adapter_name)
                    continue
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                self._running.append(request)
                started.add(request.request_id)
                scheduled[request.request_id] = ScheduledRequest(
                    request, num_new, is_prefill=is_prefill_step(request)
                )
                budget -= num_new
        finally:
            if started:
                self._waiting = deque(r for r in self._waiting if r.request_id not in started)

    def _call_admit(self, admit: Callable[[Request], bool], request: Request) -> bool:
        """``admit(request)``; if it raises, the request's pages are given back first."""
        try:
            return admit(request)
        except BaseException:
            self._undo_start(request)
            raise

    def _num_new_waiting_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining <= budget:
            return remaining
        if self.config.chunked_prefill or remaining > self.config.max_num_batched_tokens:
            return budget
        return 0

    def _undo_start(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_cached_tokens = 0

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._waiting.appendleft(request)
        logger.debug(
            "preempted %s (%d tokens, %d preemptions)",
            request.request_id,
            request.num_tokens,
            request.num_preemptions,
        )
        if self._release is not None:
            self._release(request)

    # ----------------------------------------------------------------- progress
    def advance(self, output: SchedulerOutput) -> None:
        """Record that the step ran: computed counts grow and newly full pages are cached.

        Requests finished or aborted since ``schedule`` are skipped.
        """
        for item in output.scheduled:
            request = item.request
            if (
                self._requests.get(item.request_id) is not request
                or request.status is not RequestStatus.RUNNING
            ):
                continue
            if request.num_computed_tokens != item.num_computed_tokens:
                raise RuntimeError(f"request {item.request_id!r} advanced twice for one step")
            request.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_pages(request)

    def finish_request(
        self, request_id: str, status: RequestStatus, error: str | None = None
    ) -> None:
        """End a request: free its pages, release it, drop it from the queues (idempotent)."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        was_running = request.status is RequestStatus.RUNNING
        if was_running:
            self._running.remove(request)
            self.kv.free(request)
        else:
            self._waiting.remove(request)
        request.finish(status, error)
        if was_running and self._release is not None:
            self._release(request)

    def abort_request(self, request_id: str) -> None:
        """Abort a waiting or running request (idempotent for unknown or finished ids)."""
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
