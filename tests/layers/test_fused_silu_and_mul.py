"""SiLU-and-mul's Triton kernel against its PyTorch twin (``valora.layers.activation``), with
the LoRA delta it may take as a second input (``extra``: the delta fold of
``valora.layers.lora_overlap``). Interpreter on the CPU, CUDA in the ``gpu`` variants."""

from __future__ import annotations

import pytest
import torch
from fused_testing import DTYPES, close, fresh_mode_one_thread, rand  # noqa: F401
from kernel_devices import DEVICES

from valora.layers import fused_select
from valora.layers.activation import silu_and_mul, silu_and_mul_torch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 8), (1, 2), (3, 38), (2, 3000), (2, 3, 14)])
def test_silu_and_mul_kernel_matches_twin(device: str, dtype: torch.dtype,
                                          shape: tuple[int, ...]) -> None:
    x = rand(*shape, dtype=dtype, device=device, seed=10)
    with fused_select.fused_layers("on"):
        got = silu_and_mul(x)
    close(got, silu_and_mul_torch(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["on", "off"], ids=["kernel", "twin"])
def test_silu_and_mul_with_extra_is_that_of_the_sum(device: str, dtype: torch.dtype,
                                                    mode: str) -> None:
    """``silu_and_mul(x, extra)`` = ``silu_and_mul(x + extra)`` (the sum rounded to the dtype
    first, as an ``add_`` before it); a misfit ``extra`` is refused."""
    x = rand(5, 38, dtype=dtype, device=device, seed=12)
    extra = rand(5, 38, dtype=dtype, device=device, seed=13)
    with fused_select.fused_layers(mode):
        got = silu_and_mul(x, extra)
        with pytest.raises(ValueError, match="extra"):
            silu_and_mul(x, extra[:, :36])
        with pytest.raises(ValueError, match="extra"):
            silu_and_mul(x, extra.double())
    want = silu_and_mul_torch(x + extra)
    if dtype == torch.float32:
        close(got, want)
    else:  # three roundings (the sum, silu, the product); the CPU interpreter's bf16 casts
        # need not round as the GPU's do, so one more step of the dtype there
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -5, atol=2e-2)
    if mode == "off" or device == "cuda":  # bit-equal to the add it replaces
        with fused_select.fused_layers(mode):
            assert torch.equal(got, silu_and_mul(x.clone().add_(extra)))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_row_strided_and_column_strided_inputs(device: str) -> None:
    wide = rand(4, 40, dtype=torch.float32, device=device, seed=11)
    rows = wide[:, 4:24]  # row-strided: the kernel takes it
    columns = wide[:, ::2]  # last-dim stride 2: the PyTorch twin runs
    with fused_select.fused_layers("on"):
        close(silu_and_mul(rows), silu_and_mul_torch(rows))
        assert not fused_select.usable(columns)
        got = silu_and_mul(columns)
    assert torch.equal(got, silu_and_mul_torch(columns))
