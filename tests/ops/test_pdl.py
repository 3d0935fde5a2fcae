"""Programmatic dependent launch of the LoRA op (``valora.ops.pdl``, the kernels' ``PDL``).

In the CPU interpreter the grid-dependency instructions are no-ops (``lora_kernels.GDC_AVAILABLE``),
so what runs there is the control flow ``PDL`` adds — the expand's first rank chunk loaded before the wait
and computed apart, the loop and tail after it — which must give the bits of ``PDL`` = 0 for
ranks below, at and above a chunk, split-K planes, early ``y`` and the mixed-mode correction. The
mode switch is host code. On a Hopper GPU the kernel test runs the real dependent launches; the
same equality, graph-replayed at layer widths, is
``test_ops_lora_gpu.py::test_programmatic_dependent_launch_is_bit_identical``.
"""

from __future__ import annotations

import pytest
import torch

from valora.errors import ValoraError
from valora.ops import pdl
from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.pdl import PDL_MODES, pdl_levels, pdl_mode, pdl_supported, set_pdl
from valora.ops.tile_config import ExpandConfig, ShrinkConfig
from valora.ops.triton_lora import launch_expand, launch_shrink

RANKS = [1, 8, 13, 16, 17, 40, 64]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _default_mode(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("VALORA_PDL", raising=False)
    set_pdl(None)
    yield
    set_pdl(None)


def test_mode_defaults_to_off_and_follows_the_environment(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    assert pdl_mode() == "off"
    monkeypatch.setenv("VALORA_PDL", "both")
    set_pdl(None)  # the environment is read again
    assert pdl_mode() == "both"
    set_pdl("expand")
    assert pdl_mode() == "expand"


def test_unknown_modes_are_errors_naming_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValoraError, match="expand"):
        set_pdl("on")
    monkeypatch.setenv("VALORA_PDL", "1")
    set_pdl(None)
    with pytest.raises(ValoraError, match="VALORA_PDL='1'"):
        pdl_mode()


def test_levels_per_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for mode in PDL_MODES:  # the CPU (interpreter) never launches dependently
        set_pdl(mode)
        assert pdl_levels(cpu) == (0, 0, False)
    monkeypatch.setattr(pdl, "pdl_supported", lambda device: True)
    expected = {"off": (0, 0, False), "expand": (1, 2, False), "both": (1, 2, True)}
    for mode, levels in expected.items():
        set_pdl(mode)
        assert pdl_levels(cpu) == levels


def test_launch_flags() -> None:
    assert pdl.pdl_flags(0) == {}
    assert pdl.pdl_flags(1, launch=False) == {"PDL": 1}
    assert pdl.pdl_flags(2) == {"PDL": 2, "launch_pdl": True}


def _run(x: torch.Tensor, y: torch.Tensor, weights, segments: LoRASegments, shrink: ShrinkConfig,
         expand: ExpandConfig, level: int) -> torch.Tensor:
    out = y.clone()
    h = launch_shrink(x, weights, segments, shrink, pdl=min(level, 1), pdl_launch=False)
    launch_expand(h, out, weights, segments, expand, 1.0, pdl=level)
    return out


@pytest.mark.parametrize(("block_k", "split_k", "early_y", "correction"), [
    (16, 1, False, False), (16, 2, True, False), (32, 1, False, True), (64, 2, False, False),
])
def test_pdl_levels_give_the_bits_of_no_pdl(block_k: int, split_k: int, early_y: bool,
                                            correction: bool) -> None:
    if DEVICE.type == "cuda" and not pdl_supported(DEVICE):
        pytest.skip("a GPU without programmatic dependent launch")
    weights = make_slot_weights(RANKS, 48, (40, 24), torch.float32, DEVICE, seed=block_k)
    generator = torch.Generator().manual_seed(split_k)
    slots = make_token_slots(24, len(RANKS), "zipf", generator, 0.2)
    corr = None
    if correction:  # slot 3 merged: its rows carry no term, every other row is corrected
        corr = torch.where(slots == 3, -1, 3).to(torch.int32)
        slots = torch.where(slots == 3, -1, slots).to(torch.int32)
    batch = prepare_lora_batch(slots, len(RANKS), "triton", correction_slots=corr)
    if DEVICE.type == "cuda":
        batch = prepare_lora_batch(
            slots.to(DEVICE), len(RANKS), "triton", active_slots=batch.active_slots,
            correction_slots=corr.to(DEVICE) if corr is not None else None,
            correction_slot=batch.correction_slot)
    segments = batch.backend_data
    assert isinstance(segments, LoRASegments)
    x = torch.randn(24, 48, generator=generator).to(DEVICE)
    y = torch.randn(24, 64, generator=generator).to(DEVICE)
    shrink = ShrinkConfig(16, 32, 16, split_k, 4, 1)
    expand = ExpandConfig(16, 32, block_k, 4, 1, early_y)
    plain = _run(x, y, weights, segments, shrink, expand, 0)
    assert not torch.equal(plain, y)
    for level in (1, 2):
        assert torch.equal(_run(x, y, weights, segments, shrink, expand, level), plain), level
