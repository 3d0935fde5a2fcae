"""The latency estimate's phase 1 (requests a merged candidate serves) keeps every seat that
running requests do not hold: excluded *waiting* requests hold no seat (issue 5)."""

from __future__ import annotations

import pytest

from valora.orchestrator.cost_model import CostModel
from valora.orchestrator.latency_estimate import LatencyEstimator, ModeChoice
from valora.orchestrator.modes import Mode
from valora.orchestrator.queue_view import RequestView

MODEL = CostModel("test", {"const": 1e-2, "num_tokens": 1e-4, "lora_launches": 5e-3},
                  {"const": 3e-2, "bytes": 0.0})


def _request(i: int, adapter: str) -> RequestView:
    return RequestView(f"{adapter}{i}", adapter, 8, 0.0, 0, 10, context_tokens=20)


def test_excluded_waiting_requests_do_not_take_phase_one_seats() -> None:
    estimator = LatencyEstimator(MODEL, lambda r: 100.0)
    merged = ModeChoice(Mode.MERGED, "m", 8)
    served = [_request(i, "m") for i in range(3)]
    excluded = [_request(i, "o") for i in range(3)]  # waiting: they hold no seat
    first = estimator.completion_times(served, 3, merged, 0.0)
    assert max(first) == pytest.approx(min(first))  # all three run side by side
    end = max(first)
    second = min(estimator.completion_times(excluded, 3, ModeChoice(Mode.MIXED, "m", 8), end),
                 estimator.completion_times(excluded, 3, ModeChoice(Mode.UNMERGED), end + 0.03),
                 key=sum)
    expected = sum(first + second) / 6
    got = estimator.objective(merged, served, excluded, 3, 0.0, 0.03, now=0.0)
    assert got == pytest.approx(expected)


def test_deferred_running_requests_keep_their_seats() -> None:
    estimator = LatencyEstimator(MODEL, lambda r: 100.0)
    merged = ModeChoice(Mode.MERGED, "m", 8)
    served = [_request(i, "m") for i in range(2)]
    excluded = [_request(0, "o")]
    # Three seats, one held by a deferred running request: phase 1 has two.
    shared = estimator.objective(merged, served, excluded, 3, 0.0, 0.0, now=0.0, held_seats=1)
    alone = estimator.objective(merged, served, excluded, 2, 0.0, 0.0, now=0.0)
    assert shared == pytest.approx(alone)
