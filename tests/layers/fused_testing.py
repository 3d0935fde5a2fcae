"""What the fused-layer kernel tests share (``test_fused_layers.py``, ``test_fused_silu_and_mul.py``):
the dtypes, an autouse fixture (import it) that resets the mode and runs on one thread, the
tolerance of a kernel against its twin, seeded random inputs. The interpreter rounds to bf16
differently from the GPU, so bf16/fp16 comparisons allow two rounding steps of the output dtype;
fp32 comparisons are tight."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from valora.layers import fused_select

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def fresh_mode_one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    fused_select.set_fused_layers_mode(None)
    yield
    fused_select.set_fused_layers_mode(None)
    torch.set_num_threads(previous)


def close(actual: torch.Tensor, expected: torch.Tensor, atol16: float = 2e-3) -> None:
    """fp32: tight; fp16/bf16: two rounding steps (``atol16`` where the twin cancels terms)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:  # the twins round twice (e.g. normed, then weight * normed): two steps of the dtype
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2 ** -6, atol=atol16)


def rand(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(device=device, dtype=dtype)
