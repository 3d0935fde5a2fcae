"""Prefills that get their seats together share eager steps in the latency estimate, as the
engine batches them up to its token budget: the eager intercept and the LoRA launches' host cost
are charged once per shared step, not once per prefill (issue 5)."""

from __future__ import annotations

import pytest

from valora.orchestrator.cost_model import CostModel
from valora.orchestrator.latency_estimate import LatencyEstimator, ModeChoice
from valora.orchestrator.modes import Mode
from valora.orchestrator.queue_view import RequestView

EAGER, LAUNCH, PER_TOKEN = 0.010, 0.012, 1e-5
MODEL = CostModel("test", {"const": 5e-3, "num_tokens": PER_TOKEN, "eager": EAGER,
                           "eager_lora_launches": LAUNCH}, {"const": 1e-2, "bytes": 0.0},
                  graph_max_rows=64)
UNMERGED = ModeChoice(Mode.UNMERGED)


def _waiting(i: int, adapter: str | None, prompt: int = 600) -> RequestView:
    return RequestView(f"r{i}", adapter, 16 if adapter else 0, 0.0, prompt, 1)


def _last_finish(estimator: LatencyEstimator, order: list[RequestView], seats: int) -> float:
    return max(estimator.completion_times(order, seats, UNMERGED, 0.0))


def test_prefills_starting_together_share_one_eager_step() -> None:
    order = [_waiting(i, f"a{i}") for i in range(3)]
    alone = LatencyEstimator(MODEL, lambda r: 100.0)
    shared = LatencyEstimator(MODEL, lambda r: 100.0, token_budget=2048)
    # Three 600-token prefills fit one 2048-token step: two eager overheads fewer.
    saved = _last_finish(alone, order, 4) - _last_finish(shared, order, 4)
    assert saved == pytest.approx(2 * (EAGER + LAUNCH))


def test_a_step_is_charged_the_launches_of_its_most_demanding_row() -> None:
    # A base-model row first (no LoRA launch), then a LoRA row: the step pays one launch.
    order = [_waiting(0, None), _waiting(1, "a")]
    alone = LatencyEstimator(MODEL, lambda r: 100.0)
    shared = LatencyEstimator(MODEL, lambda r: 100.0, token_budget=2048)
    saved = _last_finish(alone, order, 4) - _last_finish(shared, order, 4)
    assert saved == pytest.approx(EAGER)


def test_prefills_beyond_the_budget_or_seats_make_steps_of_their_own() -> None:
    shared = LatencyEstimator(MODEL, lambda r: 100.0, token_budget=1000)
    alone = LatencyEstimator(MODEL, lambda r: 100.0)
    over_budget = [_waiting(i, f"a{i}") for i in range(2)]  # 1200 tokens > 1000
    assert _last_finish(shared, over_budget, 4) == pytest.approx(
        _last_finish(alone, over_budget, 4))
    one_seat = [_waiting(i, f"a{i}", prompt=100) for i in range(2)]  # the second waits its turn
    assert _last_finish(shared, one_seat, 1) == pytest.approx(_last_finish(alone, one_seat, 1))
