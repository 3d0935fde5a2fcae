"""Serving-benchmark sweep helpers: capacity calibration (rates as fractions of a measured burst
capacity, requests per run from a time budget) and the valora-vs-best-baseline comparison."""

from __future__ import annotations

import pytest

from valora.benchmarks.inprocess import RunResult
from valora.benchmarks.metrics import RequestTiming
from valora.benchmarks.report import (
    paired_change_interval,
    policy_comparison,
    pooled_comparison,
)
from valora.benchmarks.serve import Popularity, ServeBench, calibrate
from valora.benchmarks.workload import BenchRequest, BenchWorkload


def _bench(**options: object) -> ServeBench:
    workload = BenchWorkload(num_requests=10, rate_per_s=1.0, adapters=("a", "b"))
    return ServeBench(policies=["unmerged-fcfs", "valora"], rates=[1.0],
                      popularities=[Popularity("zipf", 1.0), Popularity("one-hot", 0.7)],
                      workload=workload, adapter_ranks={"a": 8, "b": 16}, model="default",
                      capacity_fractions=(0.25, 0.5, 1.0), calibration_requests=20,
                      **options)  # type: ignore[arg-type]


def _burst_runner(wall_s: float) -> tuple[list[list[BenchRequest]],
                                           object]:
    seen: list[list[BenchRequest]] = []

    def run(tag: str, requests: list[BenchRequest]) -> RunResult:
        seen.append(requests)
        timings = [RequestTiming(r.request_id, r.adapter, r.kind, r.arrival_s, finish_s=wall_s)
                   for r in requests]
        return RunResult(timings, None, wall_s)

    return seen, run


def test_calibrate_sets_rates_from_burst_capacity() -> None:
    seen, runner = _burst_runner(wall_s=2.0)
    bench = calibrate(_bench(), runner)  # type: ignore[arg-type]
    assert len(seen) == 1 and len(seen[0]) == 20
    assert all(r.arrival_s == 0.0 for r in seen[0])
    assert bench.capacity_per_s == 10.0
    assert list(bench.rates) == [2.5, 5.0, 10.0]
    assert bench.workload.num_requests == 10  # no budget: unchanged


def test_calibrate_fits_requests_to_budget() -> None:
    _, runner = _burst_runner(wall_s=2.0)
    # nominal seconds per request: 2 policies x 2 skews x (1/2.5 + 1/5 + 1/10) = 2.8
    bench = calibrate(_bench(run_budget_s=57.0, min_requests=4), runner)  # type: ignore[arg-type]
    assert bench.workload.num_requests == 20
    small = calibrate(_bench(run_budget_s=1.0, min_requests=4), runner)  # type: ignore[arg-type]
    assert small.workload.num_requests == 4


def _row(policy: str, popularity: str, rate: float, mean: float) -> dict[str, object]:
    return {"policy": policy, "popularity": popularity, "rate_per_s": rate,
            "metrics": {"mean_latency_s": mean}}


def test_policy_comparison_against_best_baseline() -> None:
    rows = [_row("valora", "zipf:1", 2.0, 0.7), _row("dlora", "zipf:1", 2.0, 1.0),
            _row("unmerged-fcfs", "zipf:1", 2.0, 0.9), _row("valora", "hot:0.7", 2.0, 0.8),
            _row("dlora", "hot:0.7", 2.0, 0.9), _row("merged-only", "hot:0.7", 4.0, 1.0)]
    text = policy_comparison(rows)
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, two comparable cells (hot:0.7 at 4/s has no valora)
    assert "| zipf:1 | 2 | 700.0 | unmerged-fcfs | 900.0 | -22.2% | – | yes |" in lines
    assert "| hot:0.7 | 2 | 800.0 | dlora | 900.0 | -11.1% | – | no |" in lines
    assert policy_comparison([_row("dlora", "zipf:1", 2.0, 1.0)]) == ""


def _requests(latencies: list[float]) -> list[dict[str, object]]:
    return [{"request_id": f"r{i}", "arrival_s": 1.0, "finish_s": 1.0 + value, "error": None}
            for i, value in enumerate(latencies)]


def test_paired_interval_brackets_the_change_and_shrinks_with_agreement() -> None:
    """Requests pair by id: a uniform 30 % gain gives a tight interval at -30 %; noisy per-request
    ratios give a wide one that still holds the point estimate."""
    base = [0.5 + 0.1 * (i % 7) for i in range(40)]
    exact = paired_change_interval(
        {f"r{i}": 0.7 * v for i, v in enumerate(base)}, {f"r{i}": v for i, v in enumerate(base)})
    assert exact is not None and exact[0] == pytest.approx(-0.3) and exact[1] == pytest.approx(-0.3)
    noisy_ours = {f"r{i}": v * (0.4 if i % 2 else 1.0) for i, v in enumerate(base)}
    noisy = paired_change_interval(noisy_ours, {f"r{i}": v for i, v in enumerate(base)})
    point = sum(noisy_ours.values()) / sum(base) - 1.0
    assert noisy is not None and noisy[0] < point < noisy[1] and noisy[1] - noisy[0] > 0.1
    assert paired_change_interval({"r0": 1.0}, {"r0": 2.0}) is None  # too few pairs
    rows = [{**_row("valora", "zipf:1", 2.0, 0.7), "requests": _requests([0.7] * 10)},
            {**_row("dlora", "zipf:1", 2.0, 1.0), "requests": _requests([1.0] * 10)}]
    assert "| -30% … -30% | yes |" in policy_comparison(rows)


def _run(policy: str, rate: float, capacity: float, latencies: list[float]) -> dict[str, object]:
    return {"policy": policy, "popularity": "zipf:1", "rate_per_s": rate,
            "capacity_per_s": capacity, "requests": _requests(latencies),
            "metrics": {"mean_latency_s": sum(latencies) / len(latencies)}}


def test_pooled_comparison_matches_cells_by_share_and_pools_requests() -> None:
    """Two repeats whose calibrated capacities differ (rates 3.0 and 3.3 are both 0.3 of it):
    one cell; the best baseline is chosen by the pooled mean, not per repeat."""
    first = [_run("valora", 3.0, 10.0, [0.6] * 10), _run("dlora", 3.0, 10.0, [0.5] * 10),
             _run("unmerged-fcfs", 3.0, 10.0, [1.0] * 10)]
    second = [_run("valora", 3.3, 11.0, [0.6] * 10), _run("dlora", 3.3, 11.0, [1.5] * 10),
              _run("unmerged-fcfs", 3.3, 11.0, [0.9] * 10)]
    lines = pooled_comparison([first, second]).splitlines()
    assert len(lines) == 3
    # pooled: valora 0.6, dlora 1.0, unmerged 0.95 -> unmerged-fcfs is best; each repeat's own
    # best: dlora (0.5, +20 %) and unmerged-fcfs (0.9, -33 %)
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells[:7] == ["zipf:1", "0.3", "2", "600.0", "unmerged-fcfs", "950.0", "-36.8%"]
    low, high = (float(end.strip("%")) for end in cells[7].split(" … "))
    assert low <= -36.8 <= high and high - low < 5  # pairs within each repeat, both repeats
    assert cells[8:] == ["+20%, -33%", "yes"]
    assert pooled_comparison([[_run("dlora", 3.0, 10.0, [0.5] * 10)]]) == ""
