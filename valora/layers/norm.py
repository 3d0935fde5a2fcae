"""Root-mean-square layer norm, computed in float32 whatever the model dtype, optionally fused
with the residual add that precedes it in a pre-norm decoder.

Semantics (matches Hugging Face's Llama ``RMSNorm`` bit for bit in float32)::

    rms_norm(x)            = weight * (x.float() * rsqrt(mean(x.float()², -1) + eps)).to(x.dtype)
    add_rms_norm(x, res)   = (rms_norm(s), s)   with  s = res + x   (rounded to the dtype)

``forward`` / ``forward_add`` run one Triton kernel (``fused_kernels``) where ``fused_select``
allows it, else the PyTorch twins ``rms_norm_torch`` / ``add_rms_norm_torch`` below; the residual
is returned as a new tensor, never updated in place.
"""

from __future__ import annotations

import torch
from torch import nn

from valora.layers import fused_select


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch twin of the RMSNorm kernel (the reference semantics)."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch twin of the fused residual-add + RMSNorm kernel."""
    total = residual + x
    return rms_norm_torch(total, weight, eps), total


def _fits_kernel(x: torch.Tensor) -> bool:
    from valora.layers.fused_kernels import MAX_NORM_WIDTH

    return x.dim() >= 1 and 0 < x.shape[-1] <= MAX_NORM_WIDTH


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-channel scale."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_select.usable(x, self.weight) and _fits_kernel(x):
            from valora.layers import fused_kernels

            y, _ = fused_kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)
            return y.view(x.shape)
        return rms_norm_torch(x, self.weight, self.eps)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor,
                    residual_out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rms_norm(residual + x), residual + x)``; one kernel where the kernels serve.
        ``residual_out`` (contiguous, ``x``'s shape and dtype; may be ``residual``): the sum is
        written there and returned."""
        if (x.shape == residual.shape and fused_select.usable(x, residual, self.weight)
                and _fits_kernel(x)
                and (residual_out is None or (residual_out.shape == x.shape
                                              and residual_out.dtype == residual.dtype
                                              and residual_out.is_contiguous()))):
            from valora.layers import fused_kernels

            width = x.shape[-1]
            y, total = fused_kernels.rms_norm(
                x.reshape(-1, width), self.weight, self.eps, residual.reshape(-1, width),
                None if residual_out is None else residual_out.view(-1, width))
            assert total is not None
            return y.view(x.shape), total.view(x.shape)
        y, total = add_rms_norm_torch(x, residual, self.weight, self.eps)
        if residual_out is None:
            return y, total
        return y, residual_out.copy_(total)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
