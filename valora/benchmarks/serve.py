"""The serving benchmark's sweep: for each policy, build one engine (or use the server at
``url``), then for each popularity skew and rate generate the workload, run it and turn the
timings into a result row. Rows of one sweep share the device, git sha and setup.

Rates relative to capacity (``capacity_fractions``): before the first policy's runs, its engine
serves a burst (every request arriving at 0) of ``calibration_requests`` requests of the first
skew; capacity = finished requests / wall time, and the swept rates become ``fraction ×
capacity`` for every policy (so "light / medium / near saturation" mean the same load for all).
With ``run_budget_s`` the requests per run are then chosen so the sum of the runs' nominal
durations (requests / rate) fits that budget. ``deadline_s`` skips the runs that would start after
that many seconds since the sweep began (a hard stop for time-boxed GPU runs).

``shared_engine``: one engine for every policy, the policies taking turns inside each cell
(``_run_shared``) — the comparison the serving bar asks for ("same engine, card and trace")
without process history in it. ``repeats`` (shared engine only): the whole grid that many
times on that engine, rows tagged ``repeat``; the summary then pools them
(``report.pooled_comparison``) — one short run of a host-bound engine moves by tens of points.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from valora.benchmarks.inprocess import RunResult, run_inprocess, warm_up
from valora.benchmarks.metrics import summarize
from valora.benchmarks.report import device_name, git_sha
from valora.benchmarks.workload import BenchRequest, BenchWorkload, generate
from valora.engine.components import resolve_model_path
from valora.errors import InvalidRequestError
from valora.logger import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Popularity:
    """One adapter-popularity skew: ``uniform``, ``zipf`` (``alpha``) or ``one-hot`` (``share``
    of traffic to the first adapter). ``label`` names it in results (``zipf:1``, ``hot:0.7``)."""

    kind: str
    value: float = 0.0

    @property
    def label(self) -> str:
        return {"uniform": "uniform", "zipf": f"zipf:{self.value:g}"}.get(
            self.kind, f"hot:{self.value:g}")

    def apply(self, workload: BenchWorkload) -> BenchWorkload:
        if self.kind == "zipf":
            return replace(workload, popularity="zipf", zipf_alpha=self.value)
        if self.kind == "one-hot":
            return replace(workload, popularity="one-hot", hot_fraction=self.value)
        return replace(workload, popularity="uniform")


@dataclass
class ServeBench:
    """A sweep. ``workload`` is the template (its rate and popularity are overridden per run);
    ``trace`` replaces generated workloads (one run per policy, rate label = offered rate)."""

    policies: Sequence[str]
    rates: Sequence[float]
    popularities: Sequence[Popularity]
    workload: BenchWorkload
    adapter_ranks: dict[str, int]
    model: str
    trace: Sequence[BenchRequest] | None = None
    url: str | None = None
    api_key: str | None = None
    """Bearer token for ``url`` (a server started with ``--api-key``); never written to rows."""
    warmup_requests: int = 2
    engine_options: dict[str, Any] = field(default_factory=dict)
    capacity_fractions: Sequence[float] | None = None
    calibration_requests: int = 48
    run_budget_s: float | None = None
    deadline_s: float | None = None
    capacity_per_s: float | None = None
    min_requests: int = 8
    max_requests: int = 400
    shared_engine: bool = False
    """In-process only: one engine serves every policy (see ``run_sweep``)."""
    step_trace: bool = False
    """In-process only: each row carries every step of its run (``RunResult.steps``)."""
    repeats: int = 1
    """With ``shared_engine``: run the grid this many times (rows tagged ``repeat``)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InvalidRequestError(f"repeats must be >= 1, got {self.repeats}")
        if self.repeats > 1 and not self.shared_engine:
            raise InvalidRequestError("repeats > 1 needs shared_engine (one engine, the "
                                      "policies taking turns); separate engines repeat by "
                                      "running the sweep again")


def _runs(bench: ServeBench) -> list[tuple[str, float, list[BenchRequest]]]:
    """``(popularity label, rate, requests)`` of every run of one policy."""
    if bench.trace is not None:
        span = max(r.arrival_s for r in bench.trace) or 1.0
        return [("trace", round(len(bench.trace) / span, 3), list(bench.trace))]
    return [(pop.label, rate, generate(replace(pop.apply(bench.workload), rate_per_s=rate)))
            for pop in bench.popularities for rate in bench.rates]


def _row(bench: ServeBench, policy: str, popularity: str, rate: float, result: RunResult,
         common: dict[str, Any], repeat: int = 0) -> dict[str, Any]:
    return {
        **common, "policy": policy, "popularity": popularity, "rate_per_s": rate,
        "repeat": repeat,
        "capacity_per_s": bench.capacity_per_s,
        "arrival": "trace" if bench.trace is not None else bench.workload.arrival,
        "wall_s": result.wall_s, "metrics": summarize(result.timings),
        "modes": result.modes.as_dict() if result.modes is not None else None,
        "async_scheduling": result.async_scheduling,
        "requests": [asdict(t) for t in result.timings],
        **({"steps": result.steps} if result.steps is not None else {}),
    }


Runner = Callable[[str, list[BenchRequest]], RunResult]


def _warm_requests(bench: ServeBench) -> list[BenchRequest]:
    """The first ``warmup_requests`` of the first run, plus one request per adapter (adapter
    files are read and decoded off the clock)."""
    sample = _runs(bench)[0][2]
    warm = list(sample[: bench.warmup_requests])
    if warm:
        warm += [replace(warm[0], request_id=f"adapter-{name}", adapter=name)
                 for name in bench.adapter_ranks]
    return warm


def _build_engine(bench: ServeBench, policy: str, adapter_paths: dict[str, str]) -> Any:
    from valora.engine.llm import LLM

    llm = LLM(model=bench.model, adapters=adapter_paths,
              **{**bench.engine_options, "mode_policy": policy})
    return llm.engine


def _engine_runner(bench: ServeBench, policy: str, adapter_paths: dict[str, str]) -> Runner:
    """One engine per policy, warmed up off the clock, serving every run of that policy, each
    from empty prefix and image caches (``LLMEngine.reset_caches``): the runs of a sweep replay
    the same prompts and images (one seed), and a run after another would otherwise find them
    cached — the H200 grids of sessions 5 and 6 did (their later cells prefilled 12–24 tokens an
    eager step instead of ≈ 390–760)."""
    engine = _build_engine(bench, policy, adapter_paths)
    warm = _warm_requests(bench)
    if warm:
        warm_up(engine, warm, seed=bench.workload.seed)
    return lambda tag, requests: _fresh_run(bench, engine, tag, requests)


def _fresh_run(bench: ServeBench, engine: Any, tag: str,
               requests: list[BenchRequest]) -> RunResult:
    """One run of ``requests`` on ``engine`` from empty prefix and image caches."""
    engine.reset_caches()
    return run_inprocess(engine, requests, run_tag=tag, seed=bench.workload.seed,
                         step_trace=bench.step_trace)


def _http_runner(url: str, seed: int, api_key: str | None) -> Runner:
    from valora.benchmarks.http_driver import run_http

    return lambda tag, requests: run_http(url, requests, seed=seed, api_key=api_key)


def calibrate(bench: ServeBench, runner: Runner) -> ServeBench:
    """Measure capacity with a burst and return ``bench`` with absolute rates (and, with
    ``run_budget_s``, requests per run); see the module docstring."""
    assert bench.capacity_fractions
    first = bench.popularities[0].apply(bench.workload)
    burst = generate(replace(first, num_requests=bench.calibration_requests,
                             seed=bench.workload.seed + 7919))
    result = runner("calibrate", [replace(r, arrival_s=0.0) for r in burst])
    finished = sum(1 for t in result.timings if t.finish_s is not None and t.error is None)
    capacity = max(finished, 1) / max(result.wall_s, 1e-6)
    rates = [round(f * capacity, 3) for f in bench.capacity_fractions]
    workload = bench.workload
    if bench.run_budget_s is not None:
        nominal_per_request = bench.repeats * len(bench.policies) * len(bench.popularities) * sum(
            1.0 / r for r in rates)
        count = int(bench.run_budget_s / nominal_per_request)
        workload = replace(workload, num_requests=min(max(count, bench.min_requests),
                                                      bench.max_requests))
    logger.info("capacity %.2f req/s (burst of %d in %.2f s): rates %s, %d requests per run",
                capacity, len(burst), result.wall_s, rates, workload.num_requests)
    return replace(bench, rates=rates, workload=workload, capacity_per_s=capacity)


def _free_device() -> None:
    """Drop a finished policy's engine before the next one allocates its KV cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(bench: ServeBench, adapter_paths: dict[str, str],
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every (policy, popularity, rate) and return one result row each; ``on_row`` sees each
    row as soon as its run ends (write it out, so a killed sweep keeps its finished runs)."""
    started = time.monotonic()
    common = {
        "benchmark": "serve", "device": device_name(str(bench.engine_options.get("device", "auto"))),
        "git_sha": git_sha(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "target": bench.url or "in-process",
        "setup": {"model": bench.model, "num_adapters": len(bench.adapter_ranks),
                  "adapter_ranks": sorted(set(bench.adapter_ranks.values())),
                  "model_path": str(resolve_model_path(bench.model)),
                  "workload": {k: v for k, v in asdict(bench.workload).items() if k not in (
                      "adapters", "rate_per_s", "popularity", "zipf_alpha", "hot_fraction")},
                  "engine": dict(bench.engine_options)},
    }
    if bench.shared_engine and bench.url is None and bench.policies:
        return _run_shared(bench, adapter_paths, on_row, started, common)
    rows: list[dict[str, Any]] = []
    for index, policy in enumerate(bench.policies):
        if bench.deadline_s is not None and time.monotonic() - started > bench.deadline_s:
            logger.warning("deadline: skipping policy %s", policy)
            continue
        runner = (_http_runner(bench.url, bench.workload.seed, bench.api_key)
                  if bench.url is not None
                  else _engine_runner(bench, policy, adapter_paths))
        if index == 0 and bench.capacity_fractions and bench.trace is None:
            bench = calibrate(bench, runner)
        for popularity, rate, requests in _runs(bench):
            if bench.deadline_s is not None and time.monotonic() - started > bench.deadline_s:
                logger.warning("deadline: skipping %s %s %g", policy, popularity, rate)
                continue
            logger.info("run: policy=%s popularity=%s rate=%g (%d requests)", policy,
                        popularity, rate, len(requests))
            result = runner(f"{policy}/{popularity}/{rate:g}", requests)
            rows.append(_row(bench, policy, popularity, rate, result, common))
            if on_row is not None:
                on_row(rows[-1])
        del runner
        _free_device()
    return rows


def _run_shared(bench: ServeBench, adapter_paths: dict[str, str],
                on_row: Callable[[dict[str, Any]], None] | None, started: float,
                common: dict[str, Any]) -> list[dict[str, Any]]:
    """``run_sweep`` with one engine for every policy.

    The engine starts with the first policy that merges adapters (so its switcher, pristine
    copy and mixed graphs exist for all), each policy is warmed up on it, and inside every
    (skew, rate) cell the policies take turns — list order in even cells, reversed in odd ones —
    each run starting from the base weights (``LLMEngine.set_mode_policy``) with empty prefix
    and image caches (``LLMEngine.reset_caches``: every policy replays the same prompts). A cell
    starts only whole: the deadline skips cells, never one policy of a cell, so every row has
    its paired rows. Separate engines per policy (the default) let process history (first-use
    compiles, allocator state, the order of processes) weigh on one policy and not another; on
    one engine it weighs on all alike, and the engine's start-up is paid once.
    """
    build = next((p for p in bench.policies if p != "unmerged-fcfs"), bench.policies[0])
    engine = _build_engine(bench, build, adapter_paths)
    warm = _warm_requests(bench)
    for policy in bench.policies:
        engine.set_mode_policy(policy)
        if warm:
            warm_up(engine, warm, seed=bench.workload.seed)

    def run(policy: str, tag: str, requests: list[BenchRequest]) -> RunResult:
        engine.set_mode_policy(policy)
        return _fresh_run(bench, engine, tag, requests)

    if bench.capacity_fractions and bench.trace is None:
        first = bench.policies[0]
        bench = calibrate(bench, lambda tag, requests: run(first, tag, requests))
    rows: list[dict[str, Any]] = []
    cells = _runs(bench)
    for repeat in range(bench.repeats):
        for index, (popularity, rate, requests) in enumerate(cells):
            if bench.deadline_s is not None and time.monotonic() - started > bench.deadline_s:
                logger.warning("deadline: skipping the cell %s %g (repeat %d)", popularity, rate,
                               repeat)
                continue
            # Turns alternate by cell and by repeat: over two repeats every policy of a cell has
            # run both early and late in it.
            forward = (index + repeat) % 2 == 0
            order = list(bench.policies) if forward else list(reversed(bench.policies))
            for policy in order:
                logger.info("run: policy=%s popularity=%s rate=%g (%d requests, shared engine, "
                            "repeat %d)", policy, popularity, rate, len(requests), repeat)
                tag = f"{policy}/{popularity}/{rate:g}" + (f"/{repeat}" if repeat else "")
                result = run(policy, tag, requests)
                rows.append(_row(bench, policy, popularity, rate, result, common, repeat))
                if on_row is not None:
                    on_row(rows[-1])
    return rows
