"""Cost model: features per mode, least-squares fit through ``profile``, JSON per device."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from valora.errors import ValoraError
from valora.orchestrator.cost_model import (
    STEP_FEATURES,
    CostModel,
    RowWork,
    StepSpec,
    fit_cost_model,
    is_eager,
    lora_launches_per_row,
    step_shape,
)
from valora.orchestrator.modes import Mode, plan_lora_batches
from valora.orchestrator.profiling import profile, profile_grid

TRUE_STEP = {"const": 8e-3, "num_tokens": 2e-5, "num_rows": 3e-5, "context_tokens": 1e-7,
             "attention_pairs": 2e-9, "lora_token_rank": 2e-7, "lora_segment_rank": 2e-5,
             "lora_segments": 2e-4, "lora_launches": 5e-4, "eager": 6e-3,
             "eager_lora_launches": 1.5e-2}
GRAPH_MAX_ROWS = 64  # the synthetic device replays decode steps of up to 64 rows as graphs
TRUE_SWITCH = {"const": 1e-4, "bytes": 1 / 2.4e12}


def _rows() -> tuple[RowWork, ...]:
    return (RowWork("a", 8, 1, 100), RowWork("b", 16, 1, 50), RowWork("a", 8, 10, 10),
            RowWork(None, 0, 1, 30), RowWork("m", 32, 1, 70))


def test_features_per_mode() -> None:
    unmerged = step_shape(StepSpec(_rows()))
    assert (unmerged.num_tokens, unmerged.num_rows) == (14, 5)
    assert unmerged.context_tokens == 260
    assert unmerged.attention_pairs == 100 + 50 + 100 + 30 + 70
    assert unmerged.lora_token_rank == 11 * 8 + 16 + 32
    assert (unmerged.lora_segment_rank, unmerged.lora_segments, unmerged.lora_launches) == (56, 3, 1)
    mixed = step_shape(StepSpec(_rows(), Mode.MIXED, "m", 32))
    assert mixed.lora_token_rank == 11 * 8 + 16 + 13 * 32  # 13 tokens corrected with rank 32
    assert (mixed.lora_segment_rank, mixed.lora_segments, mixed.lora_launches) == (56, 3, 2)
    merged = step_shape(StepSpec((RowWork("m", 32, 5, 5),), Mode.MERGED, "m", 32))
    assert (merged.lora_token_rank, merged.lora_segments, merged.lora_launches) == (0, 0, 0)
    with pytest.raises(ValoraError, match="merged step"):
        step_shape(StepSpec(_rows(), Mode.MERGED, "m", 32))


@pytest.mark.parametrize("seed", range(5))
def test_lora_features_agree_with_plan_lora_batches(seed: int) -> None:
    """The cost features count exactly the work the slot lists give the LoRA op."""
    rng = np.random.default_rng(seed)
    ranks = {0: 4, 1: 8, 2: 16, 3: 64}
    rows = tuple(RowWork(None if s < 0 else f"a{s}", ranks.get(int(s), 0), int(n), 10)
                 for s, n in zip(rng.integers(-1, 4, 12), rng.integers(1, 5, 12), strict=True))
    slot_of = {None: -1, **{f"a{s}": s for s in ranks}}
    for merged in (None, 0, 3):
        token_slots = [slot_of[r.adapter] for r in rows for _ in range(r.num_tokens)]
        lora, correction = plan_lora_batches(token_slots, merged)
        lists = [lora] + ([correction] if correction is not None else [])
        used = [[s for s in lst if s >= 0] for lst in lists]
        mode = Mode.UNMERGED if merged is None else Mode.MIXED
        shape = step_shape(StepSpec(rows, mode, None if merged is None else f"a{merged}",
                                    0 if merged is None else ranks[merged]))
        assert shape.lora_token_rank == sum(ranks[s] for lst in used for s in lst)
        assert shape.lora_segments == sum(len(set(lst)) for lst in used)
        assert shape.lora_segment_rank == sum(ranks[s] for lst in used for s in set(lst))
        assert shape.lora_launches == sum(bool(lst) for lst in used)


def _synthetic_measure(noise: float, seed: int) -> tuple[
        CostModel, Callable[[StepSpec], float], Callable[[int], tuple[int, float]]]:
    """A step/switch 'device' whose times follow known coefficients, with relative noise."""
    truth = CostModel("truth", TRUE_STEP, TRUE_SWITCH, graph_max_rows=GRAPH_MAX_ROWS)
    rng = np.random.default_rng(seed)

    def measure(spec: StepSpec) -> float:
        return truth.step_time(spec) * float(1.0 + noise * rng.standard_normal())

    def measure_switch(num_bytes: int) -> tuple[int, float]:
        return num_bytes, truth.switch_time(num_bytes) * float(1.0 + noise * rng.standard_normal())

    return truth, measure, measure_switch


def test_profile_recovers_coefficients_exactly_without_noise() -> None:
    _, measure, measure_switch = _synthetic_measure(0.0, 0)
    samples: list[dict[str, object]] = []
    model = profile(measure, profile_grid(), device_name="synthetic", repeats=1,
                    switch_cases=[1 << 20, 1 << 30, 13 << 30], measure_switch=measure_switch,
                    samples=samples, graph_max_rows=GRAPH_MAX_ROWS)
    steps = [row for row in samples if row["kind"] == "step"]
    assert len(steps) == len(profile_grid()) and len(samples) == len(steps) + 3
    assert {"mode", "lora_token_rank", "seconds"} <= set(steps[0])
    for name in STEP_FEATURES:
        assert model.step_coefficients[name] == pytest.approx(TRUE_STEP[name], rel=1e-6), name
    assert model.switch_coefficients["bytes"] == pytest.approx(TRUE_SWITCH["bytes"], rel=1e-6)
    assert model.fit_info["step_rel_rmse"] < 1e-9
    assert {row["eager"] for row in steps} == {0, 1}


def test_profile_with_noise_predicts_held_out_steps() -> None:
    truth, measure, measure_switch = _synthetic_measure(0.02, 1)
    model = profile(measure, profile_grid(), device_name="synthetic", repeats=3,
                    switch_cases=[1 << 20, 1 << 30, 13 << 30], measure_switch=measure_switch,
                    graph_max_rows=GRAPH_MAX_ROWS)
    assert model.graph_max_rows == GRAPH_MAX_ROWS
    assert all(v >= 0 for v in model.step_coefficients.values())
    held_out = profile_grid(ranks=(32,), row_counts=(16, 48), prefill_tokens=(300,),
                            adapter_counts=(2, 8), context_tokens=(400,))
    for spec in held_out:
        assert model.step_time(spec) == pytest.approx(truth.step_time(spec), rel=0.05)
    assert model.switch_time(6 << 30) == pytest.approx(truth.switch_time(6 << 30), rel=0.05)


def test_eager_steps_are_prefills_and_batches_above_the_graphs() -> None:
    decode = tuple(RowWork("a", 8, 1, 100) for _ in range(4))
    assert not is_eager(decode, 4) and is_eager(decode, 3) and is_eager(decode, 0)
    assert is_eager((*decode[:3], RowWork("a", 8, 2, 100)), 64)  # a chunk or a prefill
    shape = step_shape(StepSpec(decode), graph_max_rows=4)
    assert shape.eager == 0 and shape.features()[-2:] == [0, 0]
    shape = step_shape(StepSpec(decode, Mode.MIXED, "m", 16))  # no graphs: eager
    assert shape.eager == 1 and shape.features()[-2:] == [1, 2]


def test_fused_correction_counts_one_launch() -> None:
    """``LoRAConfig.fuse_correction``: a mixed step makes one LoRA launch for the rows' own
    adapters and the correction, eager or replayed; the work is the same."""
    rows = (RowWork("a", 8, 1, 100), RowWork(None, 0, 1, 100), RowWork("m", 16, 1, 100))
    mixed = StepSpec(rows, Mode.MIXED, "m", 16)
    graph, fused_graph = step_shape(mixed, 4), step_shape(mixed, 4, fused_correction=True)
    assert (graph.lora_launches, fused_graph.lora_launches, graph.eager) == (2, 1, 0)
    eager, fused = step_shape(mixed), step_shape(mixed, fused_correction=True)
    assert (eager.lora_launches, fused.lora_launches) == (2, 1)
    assert fused.lora_token_rank == eager.lora_token_rank and fused.features()[-1] == 1
    base_only = StepSpec((RowWork(None, 0, 5, 100),), Mode.MIXED, "m", 16)
    assert step_shape(base_only, fused_correction=True).lora_launches == 1
    unmerged = StepSpec(rows[:2])
    assert step_shape(unmerged, fused_correction=True) == step_shape(unmerged)
    model = CostModel("truth", TRUE_STEP, TRUE_SWITCH)
    fused_model = CostModel("truth", TRUE_STEP, TRUE_SWITCH, fused_correction=True)
    assert fused_model.step_time(mixed) < model.step_time(mixed)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("adapter", [None, "a", "m"])
def test_prefill_time_charges_the_eager_step_and_its_launches(mode: Mode,
                                                               adapter: str | None) -> None:
    """A prefill alone in a step costs what ``step_time`` charges that one-row eager step, less
    the step's base (``const``, ``num_rows``, ``context_tokens``)."""
    if mode is Mode.MERGED and adapter != "m":
        return
    merged = "m" if mode.has_merged_adapter else None
    rank = 0 if adapter is None else 8
    row = RowWork(adapter, rank, 300, 300)
    spec = StepSpec((row,), mode, merged, 16 if merged else 0)
    shape = step_shape(spec, GRAPH_MAX_ROWS)
    assert shape.eager == 1 and lora_launches_per_row(adapter, rank, mode, merged) == \
        shape.lora_launches
    assert lora_launches_per_row(adapter, rank, mode, merged, fused_correction=True) == \
        step_shape(spec, GRAPH_MAX_ROWS, fused_correction=True).lora_launches
    model = CostModel("truth", TRUE_STEP, TRUE_SWITCH, graph_max_rows=GRAPH_MAX_ROWS)
    per_token = shape.lora_token_rank // 300
    base = (TRUE_STEP["const"] + TRUE_STEP["num_rows"] + TRUE_STEP["context_tokens"] * 300
            + TRUE_STEP["lora_segment_rank"] * shape.lora_segment_rank
            + TRUE_STEP["lora_segments"] * shape.lora_segments
            + TRUE_STEP["lora_launches"] * shape.lora_launches)
    got = model.prefill_time(300, 300, per_token, shape.lora_launches)
    assert got == pytest.approx(model.step_time(spec) - base, rel=1e-12)


def test_json_roundtrip_keyed_by_device(tmp_path: Path) -> None:
    path = tmp_path / "cost_models.json"
    first = CostModel("NVIDIA H200", TRUE_STEP, TRUE_SWITCH, {"step_rel_rmse": 0.01},
                      graph_max_rows=64)
    second = CostModel("cpu", {"const": 1.0}, {"bytes": 1e-9})
    first.save(path)
    second.save(path)
    assert set(json.loads(path.read_text())["devices"]) == {"NVIDIA H200", "cpu"}
    assert CostModel.load(path, "NVIDIA H200") == first
    assert CostModel.load(path, "cpu") == second
    with pytest.raises(ValoraError, match="profiled devices"):
        CostModel.load(path, "NVIDIA A100")
    # Files written before the eager terms have no graph_max_rows: 0 (and no eager costs).
    legacy = {"step": {"const": 1.0}, "switch": {}, "fit": {}}
    (tmp_path / "legacy.json").write_text(json.dumps({"version": 1, "devices": {"x": legacy}}))
    assert CostModel.load(tmp_path / "legacy.json", "x").graph_max_rows == 0
    (tmp_path / "bad.json").write_text('{"version": 1, "devices": {"x": {"step": 3}}}')
    with pytest.raises(ValoraError, match="malformed"):
        CostModel.load(tmp_path / "bad.json", "x")
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(ValoraError, match="not a valora cost model"):
        CostModel.load(tmp_path / "other.json", "x")


def test_invalid_models_and_fits_raise() -> None:
    with pytest.raises(ValoraError, match="unknown cost coefficients"):
        CostModel("d", {"flops": 1.0}, {})
    with pytest.raises(ValoraError, match=">= 0"):
        CostModel("d", {"const": -1.0}, {})
    with pytest.raises(ValoraError, match="step samples"):
        fit_cost_model("d", [(step_shape(StepSpec(_rows())), 0.01)])
    assert CostModel("d", {"const": 1.0}, {}).switch_time(0) == 0.0
