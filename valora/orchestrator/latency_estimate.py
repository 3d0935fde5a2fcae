"""Estimate the mean latency of every queued + running request under a candidate mode.

Used by the ``valora`` policy to compare candidates. The model, per candidate:

1. Switch: every request waits ``switch_s`` (merge / unmerge the candidate needs).
2. Phase 1: requests the candidate serves (all of them, or only ``m``'s in merged mode) share
   ``seats`` batch seats: running ones first, then waiting ones in priority order, each taking the
   next seat to free. A request finishes ``prefill + outputs_left · step_s`` after it gets a seat,
   and its ``prefill`` (the time its remaining prompt tokens add to a step, plus the eager step's
   overhead and its LoRA launches under the candidate: ``CostModel.prefill_time``) also delays
   everyone holding a seat then. With ``token_budget`` set, prefills that get their seats at the
   same moment share eager steps while their tokens fit the budget, as the engine batches them:
   the step's overhead (``CostModel.eager_overhead``, its launches those of its most demanding
   row) is charged once per shared step, not once per prefill — charged per prefill, a candidate
   that admits a batch of requests looked no better than serving them one after another, which
   favoured merged(m) over mixed(m) while other adapters' requests queued. ``step_s`` is the
   cost model's decode step for the phase's first full batch in that mode.
3. Phase 2 (merged only): the requests it excluded start when phase 1 ends, served either mixed
   (no switch) or unmerged after an unmerge, whichever finishes them sooner.

The objective is the mean remaining time to completion plus ``deadline_weight`` times the mean
estimated overshoot of latency targets (age + remaining time − target). Ages are left out of the
mean (they are the same for every candidate), so relative differences between candidates are
differences in what the choice can still change. New arrivals are not
modelled; the estimate is recomputed every step. Cost: ``O(n log seats)`` per candidate.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from valora.orchestrator.cost_model import (
    CostModel,
    RowWork,
    StepSpec,
    lora_launches_per_row,
    lora_rank_per_token,
)
from valora.orchestrator.modes import Mode
from valora.orchestrator.queue_view import RequestView


@dataclass(frozen=True)
class ModeChoice:
    """A candidate weights/batch configuration: ``mode`` with ``merged`` adapter (and rank)."""

    mode: Mode
    merged: str | None = None
    merged_rank: int = 0

    def serves(self, request: RequestView) -> bool:
        return self.mode is not Mode.MERGED or request.adapter == self.merged


@dataclass(frozen=True)
class LatencyEstimator:
    """Mean-latency objective of a candidate (see module docstring)."""

    cost_model: CostModel
    target_of: Callable[[RequestView], float]
    deadline_weight: float = 1.0
    token_budget: int | None = None
    """Tokens one step may compute (prefills starting together share steps up to it); None:
    every prefill makes an eager step of its own."""

    def decode_step_s(self, requests: Sequence[RequestView], choice: ModeChoice) -> float:
        rows = tuple(RowWork(r.adapter, r.rank, 1,
                             r.context_tokens + r.prompt_tokens_remaining + 1) for r in requests)
        return self.cost_model.step_time(StepSpec(rows, choice.mode, choice.merged,
                                                  choice.merged_rank))

    def _prefill_parts(self, request: RequestView, choice: ModeChoice) -> tuple[float, int]:
        """(seconds of the prefill's token work, LoRA launches its row makes) under ``choice``."""
        tokens = request.prompt_tokens_remaining
        if tokens <= 0:
            return 0.0, 0
        rank = lora_rank_per_token(request.adapter, request.rank, choice.mode, choice.merged,
                                   choice.merged_rank)
        launches = lora_launches_per_row(request.adapter, request.rank, choice.mode,
                                         choice.merged, self.cost_model.fused_correction)
        work = self.cost_model.added_tokens_time(tokens, request.context_tokens + tokens, rank)
        return work, launches

    def completion_times(self, order: Sequence[RequestView], seats: int, choice: ModeChoice,
                         start_s: float) -> list[float]:
        """Seconds from now until each request of ``order`` finishes (seat-by-seat model).

        A request's prefill lengthens the steps it runs in, so it delays every request holding
        a seat at that moment as well as itself: finish times of seat holders are kept relative
        to a running ``delay`` that each prefill increases.
        """
        if not order:
            return []
        seats = max(1, seats)
        step_s = self.decode_step_s(order[:seats], choice)
        delay = 0.0
        holders: list[tuple[float, int]] = [(start_s, -1)] * min(seats, len(order))
        finished = [0.0] * len(order)
        budget = self.token_budget
        step_base = None  # the shared eager step now filling: its seats' base time,
        step_tokens = 0   # its tokens so far and the LoRA launches already charged for it
        step_launches = 0
        for index, request in enumerate(order):
            base, previous = heapq.heappop(holders)
            if previous >= 0:
                finished[previous] = base + delay
            begin = base + delay
            tokens = request.prompt_tokens_remaining
            prefill_s = 0.0
            if tokens > 0:
                work, launches = self._prefill_parts(request, choice)
                if (budget is not None and base == step_base
                        and step_tokens + tokens <= budget):
                    extra = max(0, launches - step_launches)  # the step's overhead is paid
                    prefill_s = work + self.cost_model.eager_overhead(extra, shared=True)
                    step_tokens += tokens
                    step_launches += extra
                else:
                    prefill_s = work + self.cost_model.eager_overhead(launches)
                    step_base, step_tokens, step_launches = base, tokens, launches
            delay += prefill_s
            end = begin + prefill_s + request.output_tokens_remaining * step_s
            heapq.heappush(holders, (end - delay, index))
        for base, index in holders:
            if index >= 0:
                finished[index] = base + delay
        return finished

    def objective(self, choice: ModeChoice, served: Sequence[RequestView],
                  excluded: Sequence[RequestView], seats: int, switch_s: float,
                  switch_back_s: float, now: float, held_seats: int = 0) -> float:
        """Mean estimated latency (+ target penalty) of ``served`` then ``excluded`` requests.

        ``held_seats``: seats phase 1 cannot use (running requests the candidate defers keep
        their KV pages); excluded *waiting* requests hold none."""
        first = self.completion_times(served, seats - held_seats, choice, switch_s)
        second: list[float] = []
        if excluded:
            phase_end = max(first, default=switch_s)
            mixed = ModeChoice(Mode.MIXED, choice.merged, choice.merged_rank)
            options = [self.completion_times(excluded, seats, mixed, phase_end),
                       self.completion_times(excluded, seats, ModeChoice(Mode.UNMERGED),
                                             phase_end + switch_back_s)]
            second = min(options, key=sum)
        requests = list(served) + list(excluded)
        total = 0.0
        overshoot = 0.0
        for request, completion in zip(requests, first + second, strict=True):
            total += completion
            latency = now - request.arrival_time + completion
            overshoot += max(0.0, latency - self.target_of(request))
        return (total + self.deadline_weight * overshoot) / max(1, len(requests))
