"""Summary metrics on hand-made timings (values worked out by hand)."""

from __future__ import annotations

import pytest

from valora.benchmarks.metrics import RequestTiming, summarize


def _timing(rid: str, arrival: float, first: float, finish: float, tokens: int,
            target: float | None = 1.0) -> RequestTiming:
    return RequestTiming(rid, "a", "short", arrival, target, first, finish, tokens)


def test_summary_by_hand() -> None:
    timings = [
        _timing("r0", 0.0, 0.1, 0.5, 5),   # latency 0.5, ttft 0.1, tpot 0.1
        _timing("r1", 1.0, 1.2, 2.0, 3),   # latency 1.0, ttft 0.2, tpot 0.4
        _timing("r2", 2.0, 2.3, 3.5, 1),   # latency 1.5 (misses 1.0), ttft 0.3, no tpot
        RequestTiming("r3", "a", "long", 2.5, 1.0, error="QueueFullError: full"),
    ]
    s = summarize(timings)
    assert s["num_requests"] == 4 and s["num_finished"] == 3 and s["num_failed"] == 1
    assert s["mean_latency_s"] == pytest.approx(1.0)
    assert s["p50_latency_s"] == pytest.approx(1.0)
    assert s["p90_latency_s"] == pytest.approx(1.4)
    assert s["mean_ttft_s"] == pytest.approx(0.2)
    assert s["mean_tpot_s"] == pytest.approx(0.25)
    assert s["target_attainment"] == pytest.approx(2 / 3)
    assert s["throughput_rps"] == pytest.approx(3 / 3.5)
    assert s["output_tokens_per_s"] == pytest.approx(9 / 3.5)


def test_no_targets_no_attainment_and_empty_run() -> None:
    s = summarize([_timing("r0", 0.0, 0.1, 0.2, 2, target=None)])
    assert s["target_attainment"] is None
    empty = summarize([RequestTiming("r0", None, "short", 0.0, error="boom")])
    assert empty["num_failed"] == 1 and empty["mean_latency_s"] is None
