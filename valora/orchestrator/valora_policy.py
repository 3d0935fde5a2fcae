"""The ``valora`` mode policy: pick unmerged / merged(m) / mixed(m) by estimated mean latency.

Each step, for the unmerged candidate and, for each of the ``num_candidate_adapters`` adapters
with the most LoRA work queued (plus the one merged now), merged(m) and mixed(m):

1. Admission order is earliest deadline first (deadline = arrival + latency target: the request's
   own, else its adapter's default, else ``default_latency_target_s``, else ``starvation_s``).
   *Starvation guard*: a request whose wait would reach ``starvation_s`` within
   ``guard_steps`` of the longest plausible steps goes first, whatever the mode; merged(m) is not a candidate while
   such a request of another adapter exists (mixed(m) serves it without unmerging).
2. The candidate's admissions, deferrals (running rows merged(m) cannot run) and switch cost are
   scored by :class:`LatencyEstimator`.
3. Hysteresis: changing the merged weights needs a relative gain over the best candidate that
   keeps them of at least ``hysteresis`` *and* of the cost model's own relative step error (the
   fit's ``step_rel_rmse``, when the model was profiled): a predicted gain inside the model's
   error is no evidence, while the switch cost is certain. (On the H200 the graph-replay profile
   fitted with 38 % error; with it the policy switched 7–23 times per 45 requests and the
   serving runs lost 18–74 % to unmerged-FCFS.) It also needs ``min_dwell_s`` since
   the last change. Moving between merged(m) and mixed(m) is free and needs neither.
4. Calibration (optional, on in the engine): the steps the engine runs are reported back
   (:meth:`ValoraPolicy.observe_step`) and the plan uses the profile scaled by the measured ratio
   per path, eager or graph-replayed (``valora.orchestrator.calibration``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from valora.errors import InvalidRequestError
from valora.orchestrator.calibration import StepCalibration
from valora.orchestrator.cost_model import CostModel, StepSpec, step_shape
from valora.orchestrator.latency_estimate import LatencyEstimator, ModeChoice
from valora.orchestrator.modes import Mode, ModeState
from valora.orchestrator.policies import admit, starving
from valora.orchestrator.queue_view import ModeDecision, QueueView, RequestView


@dataclass(frozen=True)
class _Scored:
    choice: ModeChoice
    admitted: tuple[str, ...]
    deferred: tuple[str, ...]
    cost: float


@dataclass(frozen=True)
class ValoraPolicy:
    """Cost-model driven mode choice with latency targets and a starvation bound."""

    cost_model: CostModel
    starvation_s: float = 10.0
    latency_targets: Mapping[str, float] = field(default_factory=dict)
    default_latency_target_s: float | None = None
    hysteresis: float = 0.05
    min_dwell_s: float = 0.0
    num_candidate_adapters: int = 3
    deadline_weight: float = 1.0
    horizon_requests: int = 128
    guard_steps: float = 2.0
    calibration: StepCalibration | None = None
    """Measured-over-predicted step times of the running engine (None: plan with the profile
    as it is). Mutable; the policy reads it at every decision."""
    name: str = "valora"
    _planning: list[tuple[int, CostModel]] = field(default_factory=list, compare=False,
                                                   repr=False)

    def __post_init__(self) -> None:
        if self.starvation_s <= 0 or self.hysteresis < 0 or self.min_dwell_s < 0:
            raise InvalidRequestError("valora policy: starvation_s > 0, hysteresis >= 0, "
                                      "min_dwell_s >= 0 required")
        if self.num_candidate_adapters < 0 or self.horizon_requests < 1 or self.guard_steps < 0:
            raise InvalidRequestError("valora policy: num_candidate_adapters >= 0, "
                                      "horizon_requests >= 1, guard_steps >= 0 required")

    @property
    def switch_margin(self) -> float:
        """The relative gain a weight change must promise: ``hysteresis`` or the cost model's
        relative step error, whichever is larger (capped below 1)."""
        error = float(self.cost_model.fit_info.get("step_rel_rmse", 0.0) or 0.0)
        return min(0.95, max(self.hysteresis, error))

    @property
    def planning_model(self) -> CostModel:
        """The cost model decisions use: the profile, scaled by the calibration when there is
        one (made once per calibration version)."""
        calibration = self.calibration
        if calibration is None:
            return self.cost_model
        if not self._planning or self._planning[0][0] != calibration.version:
            self._planning[:] = [(calibration.version, calibration.apply(self.cost_model))]
        return self._planning[0][1]

    def observe_step(self, step: StepSpec, seconds: float, graphed: bool) -> None:
        """Report an executed step (its rows, mode and measured seconds) to the calibration.
        Steps the profile would charge on the other path (eager vs graph-replayed) are skipped:
        their ratio says nothing about either path's scale."""
        if self.calibration is None:
            return
        shape = step_shape(step, self.cost_model.graph_max_rows, self.cost_model.fused_correction)
        eager = bool(shape.eager)
        if eager == graphed:
            return
        self.calibration.observe(self.cost_model.step_time(shape), seconds, eager)

    def target_of(self, request: RequestView) -> float:
        """Latency target: the request's own, its adapter's default, the global default, or the
        starvation bound."""
        if request.latency_target_s is not None:
            return request.latency_target_s
        if request.adapter is not None and request.adapter in self.latency_targets:
            return self.latency_targets[request.adapter]
        if self.default_latency_target_s is not None:
            return self.default_latency_target_s
        return self.starvation_s

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        if not view.all_requests:
            return ModeDecision(state.mode, state.merged_adapter)
        model = self.planning_model
        estimator = LatencyEstimator(model, self.target_of, self.deadline_weight,
                                     view.token_budget)
        guard = self.guard_steps * self._longest_step_s(view, estimator)
        late = starving(view.all_requests, now, self.starvation_s, guard)
        late_ids = {r.request_id for r in late}
        order = sorted(view.waiting, key=lambda r: (r.request_id not in late_ids,
                                                    r.arrival_time + self.target_of(r),
                                                    r.arrival_time, r.request_id))
        scored = [self._score(choice, view, state, order, estimator, now)
                  for choice in self._candidates(view, state, late)]
        best = min(scored, key=lambda s: s.cost)
        keep = [s for s in scored if state.same_weights(s.choice.mode, s.choice.merged)]
        if keep and not state.same_weights(best.choice.mode, best.choice.merged):
            best_keep = min(keep, key=lambda s: s.cost)
            dwelling = now - state.since < self.min_dwell_s
            if dwelling or best.cost >= (1.0 - self.switch_margin) * best_keep.cost:
                best = best_keep
        return ModeDecision(best.choice.mode, best.choice.merged, best.admitted, best.deferred)

    def _candidates(self, view: QueueView, state: ModeState,
                    late: list[RequestView]) -> list[ModeChoice]:
        work: dict[str, int] = {}
        for request in view.all_requests:
            if request.adapter is not None and request.adapter in view.adapters:
                work[request.adapter] = (work.get(request.adapter, 0)
                                         + request.rank * max(1, request.tokens_remaining))
        top = sorted(work, key=lambda a: (-work[a], a))[:self.num_candidate_adapters]
        current = state.merged_adapter if state.mode.has_merged_adapter else None
        if current is not None and current not in top and current in view.adapters:
            top.append(current)
        choices = [ModeChoice(Mode.UNMERGED)]
        for adapter in top:
            rank = view.adapters[adapter].rank
            choices.append(ModeChoice(Mode.MIXED, adapter, rank))
            if adapter in work and all(r.adapter == adapter for r in late):
                choices.append(ModeChoice(Mode.MERGED, adapter, rank))
        return choices

    def _score(self, choice: ModeChoice, view: QueueView, state: ModeState,
               order: list[RequestView], estimator: LatencyEstimator, now: float) -> _Scored:
        kept = [r for r in view.running if choice.serves(r)]
        deferred = [r for r in view.running if not choice.serves(r)]
        admitted = admit((r for r in order if choice.serves(r)), view, kept)
        admitted_set = set(admitted)
        # The estimate looks at the first ``horizon_requests`` waiting requests (plus admissions).
        horizon = order[:self.horizon_requests]
        served = kept + [r for r in order if r.request_id in admitted_set]
        served += [r for r in horizon if choice.serves(r) and r.request_id not in admitted_set]
        excluded = deferred + [r for r in horizon if not choice.serves(r)]
        seats = len(view.running) + view.free_seats
        switch_s = self._switch_s(view, state, choice)
        back_s = self._bytes_switch_s(view, choice.merged)
        cost = estimator.objective(choice, served, excluded, seats, switch_s, back_s, now,
                                   held_seats=len(deferred))
        return _Scored(choice, admitted, tuple(r.request_id for r in deferred), cost)

    def _switch_s(self, view: QueueView, state: ModeState, choice: ModeChoice) -> float:
        if state.same_weights(choice.mode, choice.merged):
            return 0.0
        return self._bytes_switch_s(view, state.merged_adapter) + self._bytes_switch_s(
            view, choice.merged)

    def _bytes_switch_s(self, view: QueueView, adapter: str | None) -> float:
        """One merge or unmerge of ``adapter`` (an unknown adapter costs the largest known)."""
        if adapter is None:
            return 0.0
        if adapter in view.adapters:
            return self.cost_model.switch_time(view.adapters[adapter].merge_bytes)
        return self._max_switch_s(view)

    def _longest_step_s(self, view: QueueView, estimator: LatencyEstimator) -> float:
        """A step's time at its largest: every seat decoding, a full token budget of prefill
        paying the two largest ranks (mixed mode), after unmerging one adapter and merging another.
        A request is admitted once its wait is within ``guard_steps`` of these of the bound."""
        seats = view.all_requests[:len(view.running) + view.free_seats]
        max_rank = max((r.rank for r in view.all_requests), default=0)
        max_rank = max([max_rank] + [info.rank for info in view.adapters.values()])
        model = estimator.cost_model
        prefill = model.prefill_time(
            view.token_budget, view.token_budget, 2 * max_rank,
            lora_launches=1 if model.fused_correction else 2)
        return (estimator.decode_step_s(seats, ModeChoice(Mode.UNMERGED)) + prefill
                + 2 * self._max_switch_s(view))

    def _max_switch_s(self, view: QueueView) -> float:
        return max((self.cost_model.switch_time(info.merge_bytes)
                    for info in view.adapters.values()), default=0.0)

