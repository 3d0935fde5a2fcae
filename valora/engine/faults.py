"""Telling device faults apart from ordinary step failures.

A CUDA error inside a step (illegal memory access, device-side assert, a failed launch, ECC) is
sticky: the CUDA context is unusable afterwards and every later step would fail or hang. The
engine therefore fails the step's requests *and* marks itself unhealthy at the first such error,
while any other exception only fails the step's requests (see ``LLMEngine.step``).
"""

from __future__ import annotations

import torch

from valora.errors import ValoraError

_DEVICE_ERROR_MARKERS = (
    "cuda error",
    "cublas_status",
    "cudnn_status",
    "cudnn error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "triton error [cuda]",
    "nccl error",
    "ecc error",
)


class DeviceFaultError(ValoraError):
    """The accelerator reported an error inside a step; the engine no longer serves."""

    http_status = 503
    error_type = "engine_dead"


def is_device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the accelerator (see the module docstring).

    True for ``DeviceFaultError``, PyTorch's ``AcceleratorError`` (PyTorch ≥ 2.8) and any
    ``RuntimeError`` whose message carries a CUDA / cuBLAS / cuDNN error marker. Typed valora
    errors (bad input, missing adapter, prefetch failures) are never device faults.
    """
    if isinstance(exc, DeviceFaultError):
        return True
    if isinstance(exc, ValoraError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if isinstance(accelerator_error, type) and isinstance(exc, accelerator_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _DEVICE_ERROR_MARKERS)
