"""Online calibration of the cost model (``valora.orchestrator.calibration``): the measured
over predicted step time per path, applied as ``CostModel.eager_scale`` / ``graph_scale``."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from valora.errors import InvalidRequestError, ValoraError
from valora.orchestrator.calibration import StepCalibration
from valora.orchestrator.cost_model import CostModel, RowWork, StepSpec
from valora.orchestrator.policies import get_mode_policy
from valora.orchestrator.queue_view import AdapterInfo
from valora.orchestrator.simulator import SimConfig, simulate
from valora.orchestrator.workload import WorkloadSpec, adapter_names, generate_workload

MODEL = CostModel("test", {"const": 5e-3, "num_tokens": 2e-5, "num_rows": 1e-5, "eager": 1e-2,
                           "eager_lora_launches": 1e-2, "lora_launches": 1e-3},
                  {"const": 1e-2, "bytes": 1e-12}, graph_max_rows=8)
DECODE = StepSpec((RowWork("a", 16, 1, 100), RowWork("b", 8, 1, 90)))  # graph-replayed
PREFILL = StepSpec((RowWork("a", 16, 600, 600),))  # eager


def test_scale_stays_one_until_enough_steps_then_follows_the_ratio() -> None:
    calibration = StepCalibration(min_samples=4)
    for _ in range(3):
        calibration.observe(0.010, 0.020, eager=True)
    assert calibration.eager_scale == 1.0  # three observations: not yet
    calibration.observe(0.010, 0.020, eager=True)
    assert calibration.eager_scale == pytest.approx(2.0)  # bias-corrected: no pull towards 1
    assert calibration.graph_scale == 1.0 and calibration.num_observations == (4, 0)
    for _ in range(200):  # the host got faster: the ratio follows, smoothed
        calibration.observe(0.010, 0.012, eager=True)
    assert calibration.eager_scale == pytest.approx(1.2, rel=1e-3)


def test_scale_is_clamped_and_bad_observations_are_ignored() -> None:
    calibration = StepCalibration(min_samples=1, max_scale=4.0)
    calibration.observe(0.001, 1.0, eager=False)
    assert calibration.graph_scale == pytest.approx(4.0)
    version = calibration.version
    for bad in ((0.0, 1.0), (1.0, 0.0), (1.0, math.nan), (math.inf, 1.0)):
        calibration.observe(*bad, eager=False)
    assert calibration.version == version and calibration.graph_scale == pytest.approx(4.0)
    with pytest.raises(InvalidRequestError):
        StepCalibration(smoothing=0.0)


def test_scales_multiply_each_path_and_the_prefill_terms() -> None:
    scaled = replace(MODEL, eager_scale=2.0, graph_scale=0.5)
    assert scaled.step_time(PREFILL) == pytest.approx(2.0 * MODEL.step_time(PREFILL))
    assert scaled.step_time(DECODE) == pytest.approx(0.5 * MODEL.step_time(DECODE))
    assert scaled.prefill_time(600, 600, 16, 1) == pytest.approx(
        2.0 * MODEL.prefill_time(600, 600, 16, 1))
    assert scaled.eager_overhead(1, shared=True) == pytest.approx(2.0 * 1e-2)
    assert scaled.switch_time(1 << 30) == MODEL.switch_time(1 << 30)  # switches: as profiled
    with pytest.raises(ValoraError):
        replace(MODEL, eager_scale=0.0)


def test_policy_learns_from_executed_steps_of_the_matching_path() -> None:
    calibration = StepCalibration(min_samples=2)
    policy = get_mode_policy("valora", cost_model=MODEL, calibration=calibration)
    for _ in range(2):
        policy.observe_step(PREFILL, 3.0 * MODEL.step_time(PREFILL), graphed=False)
        policy.observe_step(DECODE, 1.5 * MODEL.step_time(DECODE), graphed=True)
    policy.observe_step(PREFILL, 100.0, graphed=True)  # the model would charge it eager: skipped
    assert calibration.num_observations == (2, 2)
    planning = policy.planning_model
    assert planning.eager_scale == pytest.approx(3.0)
    assert planning.graph_scale == pytest.approx(1.5)
    assert policy.planning_model is planning  # made once per calibration version
    assert get_mode_policy("valora", cost_model=MODEL).planning_model is MODEL


def test_simulated_engine_slower_than_its_profile_is_learned() -> None:
    """The simulator reports its steps like the engine: a truth whose eager steps take twice the
    profile's time is learned as an eager scale of 2, graph replays as 1."""
    names = adapter_names(4)
    config = SimConfig({n: AdapterInfo(16, 1 << 30) for n in names}, max_num_seqs=8)
    truth = replace(MODEL, eager_scale=2.0)
    calibration = StepCalibration()
    policy = get_mode_policy("valora", cost_model=MODEL, calibration=calibration)
    requests = generate_workload(WorkloadSpec(40, 5.0, names, prompt_tokens=(100, 200),
                                              output_tokens=(4, 8), seed=3))
    simulate(policy, requests, config, truth)
    eager, graph = calibration.num_observations
    assert eager >= 8 and graph >= 8
    assert calibration.eager_scale == pytest.approx(2.0)
    assert calibration.graph_scale == pytest.approx(1.0)
