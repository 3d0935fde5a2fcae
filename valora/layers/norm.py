"""Root-mean-square layer norm, computed in float32 whatever the model dtype.

Semantics (matches Hugging Face's Llama ``RMSNorm`` bit for bit in float32)::

    y = weight * (x.float() * rsqrt(mean(x.float()², -1) + eps)).to(x.dtype)
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-channel scale."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
