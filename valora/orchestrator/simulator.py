"""Discrete-event simulation of continuous batching under a mode policy (a fake runner).

Each iteration: arrivals join the waiting queue; the policy decides from a ``QueueView``; the
runner checks the decision (admissions are waiting requests within the free seats, deferrals are
running requests, merged mode runs only the merged adapter's rows via ``plan_lora_batches``), pays
the switch time if the merged weights change, gives every scheduled row its tokens (decode: 1;
prefill: chunks within ``token_budget``) and advances simulated time by the cost model's step time.
Nothing is timed on the wall clock; everything is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from valora.errors import ValoraError
from valora.orchestrator.cost_model import CostModel, RowWork, StepSpec, step_shape
from valora.orchestrator.modes import ModeState, plan_lora_batches
from valora.orchestrator.policies import ModePolicy
from valora.orchestrator.queue_view import AdapterInfo, ModeDecision, QueueView, RequestView
from valora.orchestrator.sim_metrics import RequestRecord, SimResult
from valora.orchestrator.workload import SimRequest


@dataclass(frozen=True)
class SimConfig:
    """Batch limits and the mergeable adapters (rank + merge bytes) of the simulated engine."""

    adapters: Mapping[str, AdapterInfo]
    max_num_seqs: int = 32
    token_budget: int = 2048
    max_active_adapters: int | None = None
    idle_tick_s: float = 0.001
    max_steps: int = 1_000_000


@dataclass
class _Live:
    request: SimRequest
    record: RequestRecord
    computed: int = 0
    generated: int = 0
    last_progress: float | None = None

    def view(self, rank: int) -> RequestView:
        r = self.request
        prompt_left = max(0, r.prompt_tokens - self.computed)
        return RequestView(r.request_id, r.adapter, rank, r.arrival_time, prompt_left,
                           r.output_tokens - self.generated, self.computed, r.latency_target_s,
                           self.last_progress)


@dataclass
class _Runner:
    config: SimConfig
    cost_model: CostModel
    policy: ModePolicy
    now: float = 0.0
    state: ModeState = field(default_factory=ModeState)
    waiting: list[_Live] = field(default_factory=list)
    running: list[_Live] = field(default_factory=list)
    result: SimResult = field(default_factory=SimResult)
    slots: dict[str, int] = field(default_factory=dict)

    def rank(self, adapter: str | None) -> int:
        info = self.config.adapters.get(adapter) if adapter is not None else None
        return info.rank if info is not None else 0

    def view(self) -> QueueView:
        return QueueView(tuple(x.view(self.rank(x.request.adapter)) for x in self.running),
                         tuple(x.view(self.rank(x.request.adapter)) for x in self.waiting),
                         self.config.max_num_seqs - len(self.running), self.config.token_budget,
                         self.config.max_active_adapters, self.config.adapters)

    def step(self) -> bool:
        """One iteration; returns False when it scheduled nothing."""
        view = self.view()
        decision = self.policy.decide(view, self.state, self.now)
        batch = self._apply(decision, view)
        if self.state.mode.has_merged_adapter:
            slot = self._slot(self.state.merged_adapter)
            plan_lora_batches([self._slot(x.request.adapter) for x in batch], slot,
                              mode=self.state.mode)
        rows, start = self._allocate(batch), self.now
        if not rows:
            return False
        merged = self.state.merged_adapter
        spec = StepSpec(tuple(row for _, row in rows), self.state.mode, merged, self.rank(merged))
        shape = step_shape(spec, self.cost_model.graph_max_rows, self.cost_model.fused_correction)
        seconds = self.cost_model.step_time(shape)
        self.now += seconds
        observe = getattr(self.policy, "observe_step", None)
        if observe is not None:  # the engine reports its steps to the policy the same way
            observe(spec, seconds, not shape.eager)
        self.result.num_steps += 1
        for live, row in rows:
            self._progress(live, row.num_tokens, start)
        return True

    def _apply(self, decision: ModeDecision, view: QueueView) -> list[_Live]:
        waiting = {x.request.request_id: x for x in self.waiting}
        running = {x.request.request_id: x for x in self.running}
        if len(set(decision.admitted)) != len(decision.admitted) or not set(
                decision.admitted) <= waiting.keys() or len(decision.admitted) > view.free_seats:
            raise ValoraError(f"{self.policy.name}: bad admissions {decision.admitted}")
        merged = decision.merged_adapter
        if decision.mode.has_merged_adapter and merged not in self.config.adapters:
            raise ValoraError(f"{self.policy.name}: cannot merge unknown adapter {merged!r}")
        if not set(decision.deferred) <= running.keys():
            raise ValoraError(f"{self.policy.name}: deferred non-running {decision.deferred}")
        if not self.state.same_weights(decision.mode, decision.merged_adapter):
            seconds = sum(self.cost_model.switch_time(self.config.adapters[a].merge_bytes)
                          for a in (self.state.merged_adapter, decision.merged_adapter)
                          if a is not None)
            self.now += seconds
            self.result.switch_time_s += seconds
            self.result.num_switches += 1
            self.state = ModeState(decision.mode, decision.merged_adapter, None, self.now)
        elif decision.mode is not self.state.mode:
            self.state = ModeState(decision.mode, decision.merged_adapter, None, self.state.since)
        self.result.record_mode(self.now, decision.mode, decision.merged_adapter)
        admitted = [waiting[i] for i in decision.admitted]
        self.waiting = [x for x in self.waiting if x.request.request_id not in decision.admitted]
        self.running.extend(admitted)
        deferred = set(decision.deferred)
        return [x for x in self.running if x.request.request_id not in deferred]

    def _allocate(self, batch: Sequence[_Live]) -> list[tuple[_Live, RowWork]]:
        budget = self.config.token_budget
        rows = []
        for live in batch:
            left = live.request.prompt_tokens - live.computed
            tokens = 1 if left <= 0 else min(left, budget)
            if tokens <= 0 or budget <= 0:
                continue
            budget -= tokens
            rows.append((live, RowWork(live.request.adapter, self.rank(live.request.adapter),
                                       tokens, live.computed + tokens)))
        return rows

    def _progress(self, live: _Live, tokens: int, start: float) -> None:
        record = live.record
        since = live.request.arrival_time if live.last_progress is None else live.last_progress
        record.max_wait_s = max(record.max_wait_s, start - since)
        if record.first_scheduled_time is None:
            record.first_scheduled_time = start
        live.computed += tokens
        live.last_progress = self.now
        if live.computed >= live.request.prompt_tokens:
            live.generated += 1
            if record.first_token_time is None:
                record.first_token_time = self.now
        if live.generated >= live.request.output_tokens:
            record.finished_time = self.now
            self.running.remove(live)

    def _slot(self, adapter: str | None) -> int:
        if not self.slots:
            self.slots.update({name: i for i, name in enumerate(sorted(self.config.adapters))})
        return -1 if adapter is None else self.slots[adapter]


def simulate(policy: ModePolicy, requests: Sequence[SimRequest], config: SimConfig,
             cost_model: CostModel) -> SimResult:
    """Run ``requests`` (any order) to completion under ``policy``; raises ``ValoraError`` when the
    policy leaves requests unserved for ``max_steps`` iterations."""
    unknown = {r.adapter for r in requests if r.adapter is not None} - set(config.adapters)
    if unknown:
        raise ValoraError(f"requests use adapters missing from the config: {sorted(unknown)}")
    runner = _Runner(config, cost_model, policy)
    pending = sorted(requests, key=lambda r: (r.arrival_time, r.request_id))
    records = [RequestRecord(r.request_id, r.adapter, r.arrival_time, r.latency_target_s)
               for r in pending]
    runner.result.records = records
    next_arrival = 0
    for _ in range(config.max_steps):
        while next_arrival < len(pending) and pending[next_arrival].arrival_time <= runner.now:
            runner.waiting.append(_Live(pending[next_arrival], records[next_arrival]))
            next_arrival += 1
        if not runner.waiting and not runner.running:
            if next_arrival == len(pending):
                runner.result.end_time = runner.now
                return runner.result
            runner.now = pending[next_arrival].arrival_time
            continue
        if not runner.step():
            runner.now += config.idle_tick_s
    raise ValoraError(f"{policy.name}: {len(runner.waiting) + len(runner.running)} requests "
                      f"unfinished after {config.max_steps} steps")
