"""Which implementation of the fused per-layer ops runs: Triton kernels or their PyTorch twins.

Mode, from ``VALORA_FUSED_LAYERS`` (read once, on first use) or ``set_fused_layers_mode``:

- ``auto`` (unset, ``auto``): Triton kernels for CUDA tensors when Triton is importable; the
  PyTorch twins on the CPU (so CPU results, and CPU parity with Hugging Face, are unchanged).
- ``on`` (``1``, ``on``, ``true``): Triton kernels for every tensor (CPU tensors only work under
  ``TRITON_INTERPRET=1``, which is what the CPU tests use).
- ``off`` (``0``, ``off``, ``false``): always the PyTorch twins.

Whatever the mode, the twins run when autograd is recording through one of the inputs (the
kernels have no backward) and when an input is one the kernels do not take (see ``usable``).
The choice is made in Python at call time, so a CUDA graph records the implementation that was
selected when it was captured.

``VALORA_FUSED_KV_WRITE`` (on unless ``0`` / ``off``; read once, or ``set_fused_kv_write``):
write a step's new K and V into the paged cache with one Triton launch
(``fused_kernels.write_kv``) where ``usable`` allows — so on CUDA in the default mode, never on
the CPU unless the layer mode is ``on`` — instead of two ``index_copy_``. Measured on an H200 at
LLaVA-1.5-7B shapes, batch 32: 0.14–0.16 ms less per graph-replayed decode step in every LoRA
scenario (``bench/results/model/h200-fused-kv-4af5ff6/``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Literal

import torch

FusedMode = Literal["auto", "on", "off"]
ENV_VAR = "VALORA_FUSED_LAYERS"
_SPELLINGS: dict[str, FusedMode] = {
    "": "auto", "auto": "auto",
    "1": "on", "on": "on", "true": "on", "yes": "on",
    "0": "off", "off": "off", "false": "off", "no": "off",
}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_mode: FusedMode | None = None
KV_WRITE_ENV_VAR = "VALORA_FUSED_KV_WRITE"
_kv_write: bool | None = None


def parse_mode(text: str, name: str = ENV_VAR) -> FusedMode:
    """The mode a ``VALORA_FUSED_LAYERS`` value (or one of variable ``name``) names
    (``ValueError`` if none)."""
    try:
        return _SPELLINGS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{name}={text!r}: expected one of auto, 1/on, 0/off") from None


def fused_layers_mode() -> FusedMode:
    """The current mode (the environment's on first call unless set explicitly)."""
    global _mode
    if _mode is None:
        _mode = parse_mode(os.environ.get(ENV_VAR, ""))
    return _mode


def set_fused_layers_mode(mode: FusedMode | None) -> None:
    """Force ``mode`` for later calls; ``None`` re-reads ``VALORA_FUSED_LAYERS`` next time."""
    global _mode
    _mode = mode if mode is None else parse_mode(mode)


def fused_kv_write() -> bool:
    """Whether the one-launch K/V cache write is switched on (module docstring)."""
    global _kv_write
    if _kv_write is None:  # unset / auto / on: on where ``usable``
        _kv_write = parse_mode(os.environ.get(KV_WRITE_ENV_VAR, ""), KV_WRITE_ENV_VAR) != "off"
    return _kv_write


def set_fused_kv_write(enabled: bool | None) -> None:
    """Force the one-launch K/V write on or off; ``None`` re-reads the environment next time."""
    global _kv_write
    _kv_write = enabled


@contextmanager
def fused_layers(mode: FusedMode) -> Iterator[None]:
    """Run the ``with`` block in ``mode``, then restore the previous mode."""
    global _mode
    previous = _mode
    set_fused_layers_mode(mode)
    try:
        yield
    finally:
        _mode = previous


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton can be imported (the kernels module is imported lazily)."""
    return importlib.util.find_spec("triton") is not None


def usable(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should serve an op on ``tensors`` in the current mode.

    Requires: mode not ``off``; Triton importable; all tensors on one device (CUDA unless the
    mode is ``on``), of one float dtype among fp32/fp16/bf16, last dimension of stride 1; no
    tensor requiring grad while autograd is enabled.
    """
    mode = fused_layers_mode()
    if mode == "off" or not triton_available():
        return False
    first = tensors[0]
    if mode == "auto" and first.device.type != "cuda":
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if (t.device != first.device or t.dtype != first.dtype or t.dtype not in _KERNEL_DTYPES
                or (t.dim() and t.stride(-1) != 1) or (grad and t.requires_grad)):
            return False
    return True
