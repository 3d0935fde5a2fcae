"""The engine-start hook of the LoRA kernel warm-up (``valora.engine.warm_up.warm_up_lora``), on
the CPU: when it runs, what it is given, the config switch and its command-line flag. The warm-up
itself is tested in ``tests/ops/test_warmup.py``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import torch

import valora.engine.warm_up as warm_up
from valora.cli_config import add_engine_flags, engine_kwargs
from valora.config import EngineConfig
from valora.ops.lora import LoRASlotWeights
from valora.ops.warmup import WarmUpReport

CUDA = torch.device("cuda", 0)  # a device object only: the warm-up itself is replaced


class _Model:
    """A model's slot map: a fused layer is listed once per slice."""

    def __init__(self) -> None:
        self.qkv = LoRASlotWeights.empty(2, 4, 8, (8, 4, 4), torch.float32, "cpu")
        self.down = LoRASlotWeights.empty(2, 4, 16, (8,), torch.float32, "cpu")

    def lora_slot_map(self) -> dict[tuple[int, str], tuple[LoRASlotWeights, int]]:
        return {(0, "q"): (self.qkv, 0), (0, "k"): (self.qkv, 1), (0, "v"): (self.qkv, 2),
                (0, "down"): (self.down, 0)}


THREADS: list[int] = []
"""The ``threads`` argument of every faked warm-up call (module-wide; ``calls`` empties it)."""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    seen: list[tuple[Any, ...]] = []
    THREADS.clear()

    def fake(layers: Any, max_tokens: int, max_adapters: int, device: torch.device,
             backend: str = "triton", fused_correction: bool = False,
             threads: int = 0) -> WarmUpReport:
        seen.append((list(layers), max_tokens, max_adapters, device, backend, fused_correction))
        THREADS.append(threads)
        return WarmUpReport(2, 5, 4, 3, 4, 1.5, max(threads, 1))

    monkeypatch.setattr(warm_up, "warm_up_lora_kernels", fake)
    return seen


def test_warms_up_with_the_step_budget_and_the_slots(calls: list[tuple[Any, ...]],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    config = EngineConfig.create(max_num_batched_tokens=512)
    model = _Model()
    with caplog.at_level(logging.INFO, logger="valora"):
        report = warm_up.warm_up_lora(config, model, CUDA, "triton", 4)
    assert report is not None and report.kernels == 7
    ((layers, max_tokens, max_adapters, device, backend, fused),) = calls
    assert max_tokens == 512 and max_adapters == 4 and device == CUDA and backend == "triton"
    assert not fused  # the default policy (unmerged-fcfs) never merges: no correction forms
    assert {id(w) for w in layers} == {id(model.qkv), id(model.down)}
    assert "compiled 7 LoRA kernel variants in 1.5 s" in caplog.text
    assert THREADS == [0] and "1 threads)" in caplog.text  # 0: one per core (decided there)


def test_the_configured_thread_count_reaches_the_warm_up(calls: list[tuple[Any, ...]]) -> None:
    config = EngineConfig.create(warm_up_threads=3)
    report = warm_up.warm_up_lora(config, _Model(), CUDA, "triton", 4)
    assert report is not None and report.threads == 3 and THREADS == [3]
    with pytest.raises(ValueError, match="warm_up_threads"):
        EngineConfig.create(warm_up_threads=-1)


@pytest.mark.parametrize(("device", "backend", "slots", "options"), [
    (torch.device("cpu"), "triton", 4, {}),
    (CUDA, "reference", 4, {}),
    (CUDA, "triton", 0, {}),
    (CUDA, "triton", 4, {"warm_up_lora_kernels": False}),
], ids=["cpu", "reference", "no-slots", "switched-off"])
def test_skipped(calls: list[tuple[Any, ...]], device: torch.device, backend: str, slots: int,
                 options: dict[str, Any]) -> None:
    config = EngineConfig.create(**options)
    assert warm_up.warm_up_lora(config, _Model(), device, backend, slots) is None
    assert calls == []


def test_cli_flag_switches_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    assert EngineConfig.create(**engine_kwargs(parser.parse_args([]))).lora.warm_up_lora_kernels
    off = parser.parse_args(["--warm-up-lora-kernels", "false"])
    assert not EngineConfig.create(**engine_kwargs(off)).lora.warm_up_lora_kernels


@pytest.mark.parametrize(("policy", "fuse", "fused_forms"), [
    ("valora", True, True), ("dlora", True, True), ("merged-only", True, True),
    ("valora", False, False), ("unmerged-fcfs", True, False),
])
def test_fused_correction_forms_are_warmed_up_only_where_they_can_run(
        calls: list[tuple[Any, ...]], policy: str, fuse: bool, fused_forms: bool) -> None:
    """Fused forms serve steps with a merged adapter: only a merging policy with
    ``fuse_correction`` (the default) runs them; without it, the two-op form (plain binaries)."""
    config = EngineConfig.create(max_num_batched_tokens=64, fuse_correction=fuse,
                                 mode_policy=policy)
    assert warm_up.warm_up_lora(config, _Model(), CUDA, "triton", 4) is not None
    assert calls[0][-1] is fused_forms
