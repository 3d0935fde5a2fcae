"""Activation functions by the names checkpoints use, and the gated-MLP ``act(gate) * up``.

``get_activation(name)`` resolves a ``hidden_act`` / ``projector_hidden_act`` string:

- ``silu`` / ``swish``: ``x * sigmoid(x)``
- ``gelu``: exact (erf) GELU
- ``gelu_pytorch_tanh``: tanh-approximated GELU
- ``quick_gelu``: ``x * sigmoid(1.702 x)`` (OpenAI CLIP)
- ``relu``
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from valora.errors import ModelLoadError

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


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a fused ``[..., 2 * d]`` (gate, up) tensor."""
    return act_and_mul(x, F.silu)
