"""Programmatic dependent launch (PDL) of the Triton LoRA op: the mode switch and its levels.

On Hopper GPUs a kernel launched with PDL may start while the kernel before it in the stream is
still running, once every program of that one has signalled; it waits only where it reads what the
earlier kernel wrote. ``lora_kernels`` gives both LoRA kernels a ``PDL`` constexpr (module
docstring there, "Programmatic dependent launch"); this module says which levels
``triton_lora.lora_apply_triton`` launches with:

- ``"off"`` (the default): plain launches, the binaries of before;
- ``"expand"``: the shrink (launched plainly) lets the expand launch at once, and the expand loads
  its metadata and first ``B`` chunk before waiting for ``h``;
- ``"both"``: the shrink too is launched with PDL, so it may start behind the base GEMM.

Safety: before its wait a kernel reads only what no kernel of the step writes — tile metadata,
ranks, scales and the adapter weights, which change only through slot writes that the step waits
for before its first kernel — and every kernel waits before its first dependent access, so the
chain is safe transitively. Results are bit-identical in every mode (``tests/ops/test_pdl.py``,
``tests/ops/test_ops_lora_gpu.py``). Measured on an H200 at LLaVA-1.5-7B shapes
(``bench/results/model/h200-pdl/``): ≈ 1 % faster decode steps with one or 8 adapters, 2–3 %
slower with 32 — hence off. ``VALORA_PDL`` sets the mode for a process, ``set_pdl`` at run time.
"""

from __future__ import annotations

import functools
import os

import torch

from valora.errors import ValoraError
from valora.ops import lora_kernels


def pdl_flags(pdl: int, launch: bool = True) -> dict[str, object]:
    """The ``PDL`` constexpr and launch option of a level (none at 0: the default binaries)."""
    if pdl <= 0:
        return {}
    return {"PDL": pdl, "launch_pdl": True} if launch else {"PDL": pdl}


PDL_MODES = ("off", "expand", "both")
"""How the LoRA op's two launches use programmatic dependent launch (``pdl_levels``)."""


_PDL: list[str | None] = [None]
"""The mode set by ``set_pdl``; None: ``VALORA_PDL``'s, read when first needed."""


def set_pdl(mode: str | None) -> None:
    """The LoRA op's programmatic-dependent-launch mode from now on (``PDL_MODES``; None: the
    default, ``VALORA_PDL`` or ``"off"``; benchmarks compare modes in one process). Each mode's
    binaries are separate, so a switch compiles on first use."""
    if mode is not None and mode not in PDL_MODES:
        raise ValoraError(f"PDL mode {mode!r}: choose one of {PDL_MODES}")
    _PDL[0] = mode


def pdl_mode() -> str:
    """The current mode (``set_pdl``'s, else ``VALORA_PDL``'s, else ``"off"``); an unknown
    ``VALORA_PDL`` is an error naming the choices."""
    mode = _PDL[0]
    if mode is None:
        env = os.environ.get("VALORA_PDL", "off")
        if env not in PDL_MODES:
            raise ValoraError(f"VALORA_PDL={env!r}: choose one of {PDL_MODES}")
        mode = _PDL[0] = env
    return mode


def pdl_levels(device: torch.device) -> tuple[int, int, bool]:
    """``(shrink PDL, expand PDL, shrink launched with PDL)`` for ``lora_apply_triton`` on
    ``device`` in the current mode (module docstring): ``(0, 0, False)`` when off or
    unsupported, ``(1, 2, False)`` for ``"expand"``, ``(1, 2, True)`` for ``"both"``."""
    mode = pdl_mode()
    if mode == "off" or not pdl_supported(device):
        return 0, 0, False
    return 1, 2, mode == "both"


@functools.lru_cache(maxsize=16)
def pdl_supported(device: torch.device) -> bool:
    """Whether programmatic dependent launch is available on ``device``: a CUDA GPU of compute
    capability 9.0 or newer (Hopper), a Triton with grid dependency control, kernels not
    interpreted."""
    interpreted = type(lora_kernels.lora_shrink_kernel).__name__ == "InterpretedFunction"
    return (device.type == "cuda" and not interpreted and lora_kernels.GDC_AVAILABLE
            and torch.cuda.get_device_capability(device)[0] >= 9)
