"""The serving benchmark's sweep: for each policy, build one engine (or use the server at
``url``), then for each popularity skew and rate generate the workload, run it and turn the
timings into a result row. Rows of one sweep share the device, git sha and setup."""

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
    warmup_requests: int = 2
    engine_options: dict[str, Any] = field(default_factory=dict)


def _runs(bench: ServeBench) -> list[tuple[str, float, list[BenchRequest]]]:
    """``(popularity label, rate, requests)`` of every run of one policy."""
    if bench.trace is not None:
        span = max(r.arrival_s for r in bench.trace) or 1.0
        return [("trace", round(len(bench.trace) / span, 3), list(bench.trace))]
    return [(pop.label, rate, generate(replace(pop.apply(bench.workload), rate_per_s=rate)))
            for pop in bench.popularities for rate in bench.rates]


def _row(bench: ServeBench, policy: str, popularity: str, rate: float, result: RunResult,
         common: dict[str, Any]) -> dict[str, Any]:
    return {
        **common, "policy": policy, "popularity": popularity, "rate_per_s": rate,
        "arrival": "trace" if bench.trace is not None else bench.workload.arrival,
        "wall_s": result.wall_s, "metrics": summarize(result.timings),
        "modes": result.modes.as_dict() if result.modes is not None else None,
        "requests": [asdict(t) for t in result.timings],
    }


Runner = Callable[[str, list[BenchRequest]], RunResult]


def _engine_runner(bench: ServeBench, policy: str, adapter_paths: dict[str, str]) -> Runner:
    """One engine per policy, warmed up off the clock, serving every run of that policy."""
    from valora.engine.llm import LLM

    llm = LLM(model=bench.model, adapters=adapter_paths,
              **{**bench.engine_options, "mode_policy": policy})
    engine = llm.engine
    sample = _runs(bench)[0][2][: bench.warmup_requests]
    if sample:
        warm_up(engine, sample, seed=bench.workload.seed)
    return lambda tag, requests: run_inprocess(engine, requests, run_tag=tag,
                                               seed=bench.workload.seed)


def _http_runner(url: str, seed: int) -> Runner:
    from valora.benchmarks.http_driver import run_http

    return lambda tag, requests: run_http(url, requests, seed=seed)


def run_sweep(bench: ServeBench, adapter_paths: dict[str, str]) -> list[dict[str, Any]]:
    """Run every (policy, popularity, rate) and return one result row each."""
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
    rows = []
    for policy in bench.policies:
        runner = (_http_runner(bench.url, bench.workload.seed) if bench.url is not None
                  else _engine_runner(bench, policy, adapter_paths))
        for popularity, rate, requests in _runs(bench):
            logger.info("run: policy=%s popularity=%s rate=%g (%d requests)", policy,
                        popularity, rate, len(requests))
            result = runner(f"{policy}/{popularity}/{rate:g}", requests)
            rows.append(_row(bench, policy, popularity, rate, result, common))
    return rows
