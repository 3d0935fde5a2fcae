"""Activation functions by the names checkpoints use, and the gated-MLP ``act(gate) * up``.

``get_activation(name)`` resolves a ``hidden_act`` / ``projector_hidden_act`` string:

- ``silu`` / ``swish``: ``x * sigmoid(x)``
- ``gelu``: exact (erf) GELU
- ``gelu_pytorch_tanh``: tanh-approximated GELU
- ``quick_gelu``: ``x * sigmoid(1.702 x)`` (OpenAI CLIP)
- ``relu``

``silu_and_mul`` runs one Triton kernel (``fused_kernels.silu_and_mul``) where ``fused_select``
allows it, else the PyTorch twin ``silu_and_mul_torch``; both round ``silu(gate)`` to the dtype
before the product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from valora.errors import ModelLoadError
from valora.layers import fused_select

Activation = Callable[[torch.Tensor], torch.Tensor]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``; ``ModelLoadError`` if valora does not implement it."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(
            f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


def act_and_mul(x: torch.Tensor, act: Activation = F.silu) -> torch.Tensor:
    """Gated MLP on a fused ``[..., 2 * d]`` gate_up input: ``act(x[..., :d]) * x[..., d:]``."""
    d = x.shape[-1] // 2
    return act(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[..., 2 * d]`` (gate, up) tensor; with ``extra`` (same
    shape and dtype: a LoRA delta not yet added) of ``x + extra``, in one kernel where the
    kernels serve (``x + extra`` rounded to the dtype first, as ``x.add_(extra)`` leaves it)."""
    if extra is not None and (extra.shape != x.shape or extra.dtype != x.dtype):
        raise ValueError(f"extra {tuple(extra.shape)} {extra.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    tensors = (x,) if extra is None else (x, extra)
    if x.dim() >= 1 and x.shape[-1] % 2 == 0 and fused_select.usable(*tensors):
        from valora.layers import fused_kernels

        y = fused_kernels.silu_and_mul(
            x.reshape(-1, x.shape[-1]), None if extra is None else extra.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], x.shape[-1] // 2)
    return silu_and_mul_torch(x if extra is None else x + extra)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """The PyTorch twin of ``silu_and_mul`` (the reference semantics)."""
    return act_and_mul(x, F.silu)
