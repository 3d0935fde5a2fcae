"""Telling device faults apart from ordinary step failures.

A CUDA error inside a step (illegal memory access, device-side assert, a failed launch, ECC) is
sticky: the CUDA context is unusable afterwards and every later step would fail or hang. The
engine therefore fails the step's requests *and* marks itself unhealthy at the first such error,
while any other exception only fails the step's requests (see ``LLMEngine.step``).

After such an error the dead engine is kept for the life of the process (``retain_for_process``):
PyTorch's caching host allocator creates a CUDA event in the deleter of a pinned block that
served a non-blocking copy (an adapter's host copy, a host pristine weight copy), and against a
dead context that throws where no exception may pass — the process aborts, at the latest at
exit. Nothing of a dead engine is used again and the process has to be restarted to serve on
the device anyway, so its memory is left to the operating system. (The per-step transfers do not
rely on this: they never use PyTorch's pinned memory, ``valora.engine.host_memory``.)
"""

from __future__ import annotations

import ctypes

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


_RETAINED: list[object] = []


def retain_for_process(obj: object) -> None:
    """Keep ``obj`` (and all it references) alive until the process ends, through interpreter
    finalisation too (one extra reference the interpreter never drops; module docstring)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    _RETAINED.append(obj)


def retained() -> tuple[object, ...]:
    """What ``retain_for_process`` keeps."""
    return tuple(_RETAINED)
