"""Drive an in-process ``LLMEngine`` in real time (open loop).

Each request is submitted once the wall clock passes its arrival offset; between arrivals the
loop steps the engine while it has work and sleeps otherwise. After every step the engine's mode
(``engine.stats()["modes"]``) is sampled: the run keeps a timeline of mode changes, the number of
weight switches and the steps spent in each mode during this run (deltas of the engine's
cumulative counters, so one engine can serve several runs back to back).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from valora.benchmarks import payload
from valora.benchmarks.metrics import RequestTiming
from valora.benchmarks.workload import BenchRequest
from valora.engine.engine import LLMEngine
from valora.engine.inputs import GenerateRequest
from valora.errors import ValoraError
from valora.logger import get_logger
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams

logger = get_logger(__name__)


@dataclass
class ModeTrace:
    """Mode changes ``(t_s, mode, merged_adapter)``, switches and steps per mode within one run."""

    timeline: list[tuple[float, str, str | None]] = field(default_factory=list)
    num_switches: int = 0
    switch_seconds: float = 0.0
    steps_by_mode: dict[str, int] = field(default_factory=dict)
    num_steps: int = 0
    """Steps the engine executed in the run (``LLMEngine.num_steps``; a ``step()`` call that
    schedules nothing — e.g. one that only delivers deferred outputs — is not one)."""
    decision_seconds: float = 0.0
    graph_steps: int = 0
    eager_steps: int = 0
    cost_scales: dict[str, Any] | None = None
    """The ``valora`` policy's step-cost calibration at the run's last step (``eager`` /
    ``graph`` scale, steps ``observed`` per path); None for other policies."""
    step_totals: dict[str, float] = field(default_factory=dict)
    """Engine-side sums over the run: ``graph_seconds`` / ``eager_seconds`` (host wall time of
    graph-replayed and eager steps), ``graph_rows`` (sequences in graph steps) and
    ``eager_tokens`` (tokens in eager steps), ``piecewise_steps`` (eager steps served by
    piecewise graphs) and ``slot_loads`` (adapters written into GPU slots)."""

    def as_dict(self) -> dict[str, Any]:
        return {"timeline": [list(entry) for entry in self.timeline],
                "num_switches": self.num_switches, "switch_seconds": self.switch_seconds,
                "steps_by_mode": dict(self.steps_by_mode), "num_steps": self.num_steps,
                "decision_seconds": self.decision_seconds, "graph_steps": self.graph_steps,
                "eager_steps": self.eager_steps, "cost_scales": self.cost_scales,
                **self.step_totals}


@dataclass
class RunResult:
    """Timings in arrival order, the mode trace (in-process only) and the run's wall time."""

    timings: list[RequestTiming]
    modes: ModeTrace | None
    wall_s: float
    steps: list[list[float | int | bool | str]] | None = None
    """With ``step_trace``: each step of the run as ``[start s (from the run's start), seconds,
    graphed, rows, tokens, LoRA ops per linear, weights' mode]``
    (``valora.engine.step_trace.StepRecord``)."""
    async_scheduling: bool | None = None
    """Whether the engine scheduled asynchronously (in-process only; the setup may leave it to
    ``auto``)."""


def to_generate_request(request: BenchRequest, run_tag: str, seed: int) -> GenerateRequest:
    """Greedy, EOS ignored: the output length is exactly ``request.output_tokens``."""
    return GenerateRequest(
        messages=[{"role": "user", "content": payload.chat_content(request, seed)}],
        images=payload.images(request, seed), adapter=request.adapter,
        sampling_params=SamplingParams(max_tokens=request.output_tokens, temperature=0.0,
                                       ignore_eos=True),
        request_id=f"{run_tag}/{request.request_id}", latency_target_s=request.latency_target_s,
    )


_ENGINE_COUNTERS = ("graph_steps", "eager_steps", "graph_seconds", "eager_seconds",
                    "graph_rows", "eager_tokens", "num_preemptions", "piecewise_steps")
"""Counters of ``LLMEngine.stats()`` a run reports as differences (plus ``slot_loads``)."""
_STEP_TOTALS = (*_ENGINE_COUNTERS[2:], "slot_loads")


class _ModeSampler:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.trace = ModeTrace()
        self.start = self._read()
        self._first_step = engine.num_steps

    def _read(self) -> dict[str, Any] | None:
        stats = self.engine.stats()
        modes = stats.get("modes")
        if not modes:
            return None
        return {**modes, **{key: stats.get(key, 0) for key in _ENGINE_COUNTERS},
                "slot_loads": getattr(stats.get("adapters"), "slot_loads", 0)}

    def sample(self, now_s: float) -> None:
        # Executed steps (a call that only delivers deferred outputs runs none).
        self.trace.num_steps = self.engine.num_steps - self._first_step
        current = self._read()
        if current is None or self.start is None:
            return
        key = (str(current["mode"]), current.get("merged_adapter"))
        if not self.trace.timeline or self.trace.timeline[-1][1:] != key:
            self.trace.timeline.append((now_s, *key))
        self.trace.num_switches = int(current["num_switches"]) - int(self.start["num_switches"])
        self.trace.switch_seconds = float(current["switch_seconds"]) - float(
            self.start["switch_seconds"])
        self.trace.decision_seconds = float(current.get("decision_seconds", 0.0)) - float(
            self.start.get("decision_seconds", 0.0))
        self.trace.cost_scales = current.get("cost_scales")
        self.trace.graph_steps = int(current["graph_steps"]) - int(self.start["graph_steps"])
        self.trace.eager_steps = int(current["eager_steps"]) - int(self.start["eager_steps"])
        self.trace.step_totals = {key: float(current[key]) - float(self.start[key])
                                  for key in _STEP_TOTALS}
        before = self.start.get("steps_by_mode", {})
        self.trace.steps_by_mode = {
            mode: int(count) - int(before.get(mode, 0))
            for mode, count in current.get("steps_by_mode", {}).items()
            if int(count) - int(before.get(mode, 0)) > 0
        }


def run_inprocess(
    engine: LLMEngine, requests: Sequence[BenchRequest], *, run_tag: str = "bench",
    seed: int = 0, idle_sleep_s: float = 0.002, step_trace: bool = False,
) -> RunResult:
    """Replay ``requests`` against ``engine`` in real time; returns when every request finished
    or failed. Requests are prepared (images, text) before the clock starts. ``step_trace``:
    also return every step the engine ran meanwhile (``RunResult.steps``)."""
    specs = [to_generate_request(r, run_tag, seed) for r in requests]
    timings = {s.request_id or "": RequestTiming(r.request_id, r.adapter, r.kind, r.arrival_s,
                                                 r.latency_target_s)
               for r, s in zip(requests, specs, strict=True)}
    sampler = _ModeSampler(engine)
    records = engine.parts.runner.enable_step_trace() if step_trace else None
    first_record = len(records) if records is not None else 0
    open_ids: set[str] = set()
    clock_start = time.perf_counter()
    start = time.monotonic()

    def record(outputs: list[RequestOutput]) -> None:
        """Time ``outputs`` as they reach the caller: with ``step()``'s return, or mid-step
        through the engine's ``output_sink`` (async output processing's deferred half)."""
        now = time.monotonic() - start
        for output in outputs:
            timing = timings.get(output.request_id)
            if timing is None:
                continue
            produced = len(output.outputs[0].token_ids) if output.outputs else 0
            if produced and timing.first_token_s is None:
                timing.first_token_s = now
            timing.num_output_tokens = produced
            if output.finished:
                open_ids.discard(output.request_id)
                timing.finish_s = now
                if output.error is not None:
                    timing.error = output.error

    previous_sink, engine.output_sink = engine.output_sink, record
    try:
        next_index = 0
        while next_index < len(specs) or open_ids:
            now = time.monotonic() - start
            while next_index < len(specs) and requests[next_index].arrival_s <= now:
                spec = specs[next_index]
                rid = spec.request_id or ""
                try:
                    engine.add_request(spec)
                    open_ids.add(rid)
                except ValoraError as exc:
                    timings[rid].error = f"{type(exc).__name__}: {exc}"
                next_index += 1
            if not engine.has_unfinished_requests():
                if next_index < len(specs):
                    wait = requests[next_index].arrival_s - (time.monotonic() - start)
                    time.sleep(max(0.0, min(wait, idle_sleep_s * 50)))
                continue
            outputs = engine.step()
            sampler.sample(time.monotonic() - start)
            record(outputs)
    finally:
        engine.output_sink = previous_sink
    wall = time.monotonic() - start
    ordered = [timings[s.request_id or ""] for s in specs]
    steps = None
    if records is not None:
        steps = [[r.start_s - clock_start, *r.as_list()[1:]] for r in records[first_record:]
                 if r.start_s >= clock_start]
    return RunResult(ordered, sampler.trace if sampler.start is not None else None, wall, steps,
                     async_scheduling=engine.async_scheduling)


def warm_up(engine: LLMEngine, requests: Sequence[BenchRequest], seed: int = 0) -> None:
    """Run a few requests to completion (first-step allocations, adapter loads) off the clock."""
    result = run_inprocess(engine, [BenchRequest(**{**r.__dict__, "arrival_s": 0.0})
                                    for r in requests], run_tag="warmup", seed=seed)
    logger.info("warm-up: %d request(s) in %.2f s", len(result.timings), result.wall_s)
