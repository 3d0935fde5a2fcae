"""Per-device profiles: file naming, lookup by device and model shape, the engine's choice between
a profile and the analytic prior, and the model-level step profiler's batches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from valora.engine.mode_controller import select_cost_model
from valora.errors import ValoraError
from valora.orchestrator.cost_model import CostModel, RowWork, StepSpec
from valora.orchestrator.modes import Mode
from valora.orchestrator.step_profiler import (
    SWITCH_TARGETS,
    StepProfiler,
    default_profile_path,
    load_profile,
    model_signature,
    profile_key,
)

SPEC = SimpleNamespace(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, vocab_size=100)
STEP = {"const": 1e-3, "num_tokens": 1e-6}
SWITCH = {"const": 1e-4, "bytes": 1e-12}


class FakeModel(torch.nn.Module):
    """What ``analytic_cost_model`` reads: ``spec`` and parameters."""

    def __init__(self, spec: SimpleNamespace = SPEC) -> None:
        super().__init__()
        self.spec = spec
        self.weight = torch.nn.Parameter(torch.zeros(8, 8))


def _write(path: Path, key: str, const: float = 1e-3) -> None:
    CostModel(key, {**STEP, "const": const}, SWITCH).save(path)


def test_default_profile_path_is_per_gpu_name(tmp_path: Path) -> None:
    assert default_profile_path("NVIDIA H200", tmp_path) == tmp_path / "NVIDIA_H200.json"
    assert default_profile_path("NVIDIA H100 80GB HBM3", tmp_path).name == \
        "NVIDIA_H100_80GB_HBM3.json"
    assert default_profile_path("cpu", tmp_path).name == "cpu.json"


def test_load_profile_prefers_model_entry_then_plain_device(tmp_path: Path) -> None:
    signature = model_signature(SPEC)
    path = default_profile_path("NVIDIA H200", tmp_path)
    assert load_profile("NVIDIA H200", signature, directory=tmp_path) is None  # no file
    _write(path, "NVIDIA H200", const=2e-3)
    plain = load_profile("NVIDIA H200", signature, directory=tmp_path)
    assert plain is not None and plain.step_coefficients["const"] == 2e-3
    _write(path, profile_key("NVIDIA H200", signature), const=3e-3)
    keyed = load_profile("NVIDIA H200", signature, directory=tmp_path)
    assert keyed is not None and keyed.step_coefficients["const"] == 3e-3
    assert keyed.device_name == profile_key("NVIDIA H200", signature)


def test_load_profile_other_model_or_gpu_falls_back(tmp_path: Path) -> None:
    _write(default_profile_path("NVIDIA H200", tmp_path), profile_key("NVIDIA H200", "other"))
    assert load_profile("NVIDIA H200", model_signature(SPEC), directory=tmp_path) is None
    assert load_profile("NVIDIA H100", model_signature(SPEC), directory=tmp_path) is None


def test_explicit_profile_path_must_hold_the_device(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    with pytest.raises(ValoraError, match="does not exist"):
        load_profile("cpu", model_signature(SPEC), path)
    _write(path, "NVIDIA H200")
    with pytest.raises(ValoraError, match="no cost model"):
        load_profile("cpu", model_signature(SPEC), path)
    _write(path, "cpu", const=5e-3)
    loaded = load_profile("cpu", model_signature(SPEC), path)
    assert loaded is not None and loaded.step_coefficients["const"] == 5e-3


def test_select_cost_model_uses_profile_when_present(tmp_path: Path) -> None:
    model, cpu = FakeModel(), torch.device("cpu")
    prior = select_cost_model(model, cpu, directory=tmp_path)
    assert prior.device_name == "analytic:cpu"
    _write(default_profile_path("cpu", tmp_path), profile_key("cpu", model_signature(SPEC)), 7e-3)
    chosen = select_cost_model(model, cpu, directory=tmp_path)
    assert chosen.step_coefficients["const"] == 7e-3
    other = FakeModel(SimpleNamespace(**{**SPEC.__dict__, "num_layers": 3}))
    assert select_cost_model(other, cpu, directory=tmp_path).device_name == "analytic:cpu"
    with pytest.raises(ValoraError):
        select_cost_model(model, cpu, str(tmp_path / "missing.json"), directory=tmp_path)


@pytest.fixture(scope="module")
def tiny_model() -> object:
    from valora.engine.components import resolve_model_path
    from valora.models.loader import load_model

    return load_model(str(resolve_model_path("default")), dtype=torch.float32, device="cpu",
                      load_format="dummy")


def test_step_profiler_builds_engine_batches(tiny_model: object) -> None:
    names = ["profile-r4-0", "profile-r4-1", "profile-switch-qv"]
    ranks = {"profile-r4-0": 4, "profile-r4-1": 4, "profile-switch-qv": 16}
    targets = {name: SWITCH_TARGETS["all"] for name in names}
    targets["profile-switch-qv"] = SWITCH_TARGETS["qv"]
    profiler = StepProfiler(tiny_model, names, ranks, targets, "reference", num_pages=16)
    rows = (RowWork("profile-r4-0", 4, 1, 20), RowWork("profile-r4-1", 4, 1, 20),
            RowWork(None, 0, 8, 8))
    unmerged = profiler.batch(StepSpec(rows))
    assert unmerged.lora is not None and unmerged.lora_correction is None
    assert unmerged.attn.query_lens_cpu == [1, 1, 8]
    assert unmerged.attn.seq_lens_cpu == [20, 20, 8]
    mixed = StepSpec(rows, Mode.MIXED, "profile-r4-0", 4)
    batch = profiler.batch(mixed)
    assert batch.lora_correction is not None  # rows of r4-1 and base rows subtract r4-0
    assert profiler.measure_step(mixed) > 0
    merged = profiler.batch(StepSpec(rows[:1], Mode.MERGED, "profile-r4-0", 4))
    assert merged.lora is None and merged.lora_correction is None
    num_bytes, seconds = profiler.measure_switch("qv")
    weights = tiny_model.lora_base_weights()  # type: ignore[attr-defined]
    expected = sum(w.numel() * w.element_size() for (_, m), w in weights.items()
                   if m in ("q_proj", "v_proj"))
    assert num_bytes == expected and seconds > 0


def test_step_profiler_fuses_the_correction_when_asked(tiny_model: object) -> None:
    names = ["profile-r4-0", "profile-r4-1"]
    ranks = dict.fromkeys(names, 4)
    targets = dict.fromkeys(names, SWITCH_TARGETS["all"])
    profiler = StepProfiler(tiny_model, names, ranks, targets, "reference", num_pages=16,
                            fuse_correction=True)
    rows = (RowWork("profile-r4-0", 4, 1, 20), RowWork("profile-r4-1", 4, 1, 20),
            RowWork(None, 0, 8, 8))
    batch = profiler.batch(StepSpec(rows, Mode.MIXED, "profile-r4-0", 4))
    assert batch.lora_correction is None and batch.lora is not None
    assert batch.lora.correction_slot == profiler.slot_of["profile-r4-0"]
    assert batch.lora.correction_slots is not None
    assert profiler.measure_step(StepSpec(rows, Mode.MIXED, "profile-r4-0", 4)) > 0


def test_switch_timing_excludes_the_first_switch_per_target(
        tiny_model: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first merge of a target compiles and allocates: it runs once untimed, per target."""
    from valora.orchestrator.merge import WeightSwitcher

    merges: list[str] = []
    original = WeightSwitcher.merge

    def spy(self: WeightSwitcher, slot: int, target: str) -> object:
        merges.append(target)
        return original(self, slot, target)

    monkeypatch.setattr(WeightSwitcher, "merge", spy)
    names = ["profile-switch-qv", "profile-switch-all"]
    ranks = dict.fromkeys(names, 16)
    targets = {"profile-switch-qv": SWITCH_TARGETS["qv"],
               "profile-switch-all": SWITCH_TARGETS["all"]}
    profiler = StepProfiler(tiny_model, names, ranks, targets, "reference", num_pages=16)
    profiler.measure_switch("qv")
    profiler.measure_switch("qv")
    profiler.measure_switch("all")
    assert merges == ["qv", "qv", "qv", "all", "all"]  # one untimed per target, then timed
