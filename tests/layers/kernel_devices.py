"""Devices the fused-layer kernel tests run on: the CPU under Triton's interpreter (when
``TRITON_INTERPRET=1`` was set before the kernels were defined) and CUDA (``gpu``-marked)."""

from __future__ import annotations

import pytest
import torch

from valora.layers import fused_kernels

INTERPRETED = type(fused_kernels._rms_norm_kernel).__name__ == "InterpretedFunction"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED,
                                                 reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
]
