"""Randomised scheduling with a fake runner whose step times come from the cost model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from valora.errors import ValoraError
from valora.logger import get_logger
from valora.orchestrator.cost_model import CostModel
from valora.orchestrator.modes import Mode, ModeState
from valora.orchestrator.policies import get_mode_policy
from valora.orchestrator.queue_view import AdapterInfo, ModeDecision, QueueView
from valora.orchestrator.simulator import SimConfig, simulate
from valora.orchestrator.workload import (
    WorkloadSpec,
    adapter_names,
    generate_workload,
    mixed_ranks,
    popularity_weights,
)

_log = get_logger("tests.orchestrator")
# A device where LoRA work is proportional to tokens x rank (compute-bound, prefill-heavy image
# requests): the regime where folding the hot adapter into the weights pays. Illustrative
# coefficients, not a measurement.
COMPUTE_BOUND = CostModel(
    "simulated", {"const": 8e-3, "num_tokens": 2e-5, "num_rows": 2e-5, "context_tokens": 1.1e-7,
                  "attention_pairs": 1e-9, "lora_token_rank": 5e-7, "lora_segment_rank": 1e-6,
                  "lora_segments": 5e-5, "lora_launches": 2e-4},
    {"const": 1e-4, "bytes": 1 / 2.4e12})


def _config(count: int, ranks: tuple[int, ...], seats: int) -> tuple[tuple[str, ...], SimConfig]:
    names = adapter_names(count)
    rank_of = mixed_ranks(names, ranks)
    return names, SimConfig({n: AdapterInfo(rank_of[n], 13 << 30) for n in names}, seats)


def test_workload_is_deterministic_and_follows_its_popularity() -> None:
    names = adapter_names(8)
    spec = WorkloadSpec(4000, 50.0, names, popularity="one-hot", hot_fraction=0.7, seed=3)
    first, second = generate_workload(spec), generate_workload(spec)
    assert first == second
    hot_share = sum(r.adapter == names[0] for r in first) / len(first)
    assert hot_share == pytest.approx(0.7, abs=0.03)
    assert first[-1].arrival_time == pytest.approx(4000 / 50.0, rel=0.1)
    zipf = popularity_weights(WorkloadSpec(1, 1.0, names, popularity="zipf", zipf_alpha=1.0))
    assert zipf[0] / zipf[1] == pytest.approx(2.0) and zipf.sum() == pytest.approx(1.0)
    bursty = generate_workload(WorkloadSpec(4000, 50.0, names, arrival="gamma", cv=3.0, seed=1))
    gaps = np.diff([r.arrival_time for r in bursty])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.2)


@pytest.mark.parametrize("seed", range(6))
def test_no_request_waits_past_the_starvation_bound_under_valora(seed: int) -> None:
    names, config = _config(8, (64, 8, 16, 32), seats=48)
    bound_s = 1.0
    spec = WorkloadSpec(150, 15.0, names, popularity=("one-hot", "zipf")[seed % 2],
                        arrival=("poisson", "gamma")[seed // 2 % 2], cv=3.0, hot_fraction=0.8,
                        output_tokens=(4, 48), base_fraction=0.1, seed=seed)
    requests = generate_workload(spec)
    valora = simulate(get_mode_policy("valora", cost_model=COMPUTE_BOUND, starvation_s=bound_s),
                      requests, config, COMPUTE_BOUND)
    assert valora.all_finished
    for record in valora.records:
        assert record.arrival_time <= record.first_scheduled_time <= record.first_token_time
        assert record.first_token_time <= record.finished_time
    worst = max(r.max_wait_s for r in valora.records)
    assert worst <= bound_s, worst
    # The workload does stress the bound: serving one adapter at a time without it breaks it.
    unbounded = simulate(get_mode_policy("merged-only"), requests, config, COMPUTE_BOUND)
    assert unbounded.all_finished
    assert max(r.max_wait_s for r in unbounded.records) > bound_s


def test_every_policy_finishes_every_request() -> None:
    names, config = _config(6, (8, 16, 64), seats=16)
    requests = generate_workload(WorkloadSpec(80, 20.0, names, popularity="zipf",
                                              output_tokens=(2, 20), base_fraction=0.2, seed=9))
    options: dict[str, dict[str, object]] = {
        "unmerged-fcfs": {}, "dlora": {"starvation_s": 2.0}, "merged-only": {"starvation_s": 2.0},
        "valora": {"cost_model": COMPUTE_BOUND, "starvation_s": 2.0}}
    for name, kwargs in options.items():
        result = simulate(get_mode_policy(name, **kwargs), requests, config, COMPUTE_BOUND)
        assert result.all_finished, name
        assert result.summary()["num_requests"] == 80
        if name == "unmerged-fcfs":
            assert result.num_switches == 0
            assert {mode for _, mode, _ in result.timeline} == {Mode.UNMERGED}


def test_valora_beats_the_baselines_on_a_skewed_workload_where_merging_pays() -> None:
    names, config = _config(16, (64, 16, 32), seats=32)
    requests = generate_workload(WorkloadSpec(250, 20.0, names, popularity="one-hot",
                                              hot_fraction=0.75, output_tokens=(8, 64), seed=0))
    means = {}
    for name, kwargs in (("unmerged-fcfs", {}), ("dlora", {"starvation_s": 5.0}),
                         ("valora", {"cost_model": COMPUTE_BOUND, "starvation_s": 2.0})):
        summary = simulate(get_mode_policy(name, **kwargs), requests, config,
                           COMPUTE_BOUND).summary()
        means[name] = summary["mean_latency_s"]
        _log.info("%s: %s", name, summary)
    best_baseline = min(means["unmerged-fcfs"], means["dlora"])
    assert means["valora"] < 0.9 * best_baseline, means


@dataclass(frozen=True)
class _AdmitsTwice:
    """A broken policy: admits the same request twice."""

    name: str = "admits-twice"

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        ids = tuple(r.request_id for r in view.waiting[:1])
        return ModeDecision(Mode.UNMERGED, None, ids + ids)


@dataclass(frozen=True)
class _MergedWithStrangers:
    """A broken policy: merged mode while running another adapter's rows."""

    name: str = "merged-with-strangers"

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        ids = tuple(r.request_id for r in view.waiting)
        return ModeDecision(Mode.MERGED, "adapter-0", ids[:view.free_seats])


def test_simulator_rejects_decisions_that_break_the_contract() -> None:
    names, config = _config(2, (8,), seats=4)
    requests = generate_workload(WorkloadSpec(10, 10.0, names, popularity="uniform", seed=0))
    with pytest.raises(ValoraError, match="bad admissions"):
        simulate(_AdmitsTwice(), requests, config, COMPUTE_BOUND)
    with pytest.raises(ValoraError, match="mixed mode"):
        simulate(_MergedWithStrangers(), requests, config, COMPUTE_BOUND)
    unknown = generate_workload(WorkloadSpec(3, 1.0, ("elsewhere",), seed=0))
    with pytest.raises(ValoraError, match="missing from the config"):
        simulate(get_mode_policy("unmerged-fcfs"), unknown, config, COMPUTE_BOUND)
