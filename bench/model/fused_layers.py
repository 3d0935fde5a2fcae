"""Bench-local prototype: fused RMSNorm, rotary and SiLU-and-mul as single Triton kernels.

valora's layers (``valora/layers/norm.py``, ``rotary.py``, ``activation.py``) compute these in
plain PyTorch: about 8, 10 and 2 small kernels each, which dominate a CUDA-graph decode step's
launch gaps at 7B shapes (~25 kernels per layer, ~1.5 µs each). This module measures what fusing
them buys *without* editing those files: ``install()`` swaps them in at run time for the
"fused" rows of the benchmark only, and ``check_against_stock`` compares outputs first.
Proposed home: the layers themselves (see docs/gpu.md).

Semantics (same as the stock layers; rounding to the model dtype where they round)::

    rms_norm(x) = w * (x32 * rsqrt(mean(x32², -1) + eps)).to(dtype)
    rotary(q)   = q * cos + rotate_half(q) * sin        (fp32 math, rounded once)
    silu_and_mul(x) = silu(x[:, :d]).to(dtype) * x[:, d:]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

import valora.models.llama as llama
from valora.layers.norm import RMSNorm
from valora.layers.rotary import apply_rotary as stock_rotary


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, width, eps, stride_x, stride_y,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, stride_xt, stride_xh, stride_c,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    ok = (offs_h < heads)[:, None]
    base = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    lo = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    cos_lo = tl.load(cos_ptr + token * stride_c + offs_d).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + token * stride_c + HALF + offs_d).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + token * stride_c + offs_d).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + token * stride_c + HALF + offs_d).to(tl.float32)[None, :]
    out = y_ptr + token * heads * 2 * HALF + offs_h[:, None] * 2 * HALF + offs_d[None, :]
    tl.store(out, (lo * cos_lo - hi * sin_lo).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, (hi * cos_hi + lo * sin_hi).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, width, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < width
    gate = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + col, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * width + col, (act * up).to(y_ptr.dtype.element_ty), mask=ok)


def fused_rms_norm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    y = torch.empty_like(flat)
    width = flat.shape[1]
    _rms_norm_kernel[(flat.shape[0],)](flat, self.weight, y, width, self.eps, flat.stride(0),
                                       y.stride(0), BLOCK=triton.next_power_of_2(width),
                                       num_warps=8 if width >= 4096 else 4)
    return y.view(x.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    tokens, heads, dim = x.shape
    y = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    if tokens:
        _rotary_kernel[(tokens,)](x, cos, sin, y, heads, x.stride(0), x.stride(1), cos.stride(0),
                                  HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads),
                                  num_warps=4)
    return y


def fused_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def fused_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, width = x.shape[0], x.shape[1] // 2
    y = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(width, block))](x, y, width, x.stride(0),
                                                            BLOCK=block, num_warps=4)
    return y


_STOCK: dict[str, Callable[..., object]] = {}


def install() -> None:
    """Route valora's Llama layers through the fused kernels (until ``uninstall``)."""
    if _STOCK:
        return
    _STOCK.update(norm=RMSNorm.forward, rotary=llama.apply_rotary, act=llama.silu_and_mul)
    RMSNorm.forward = fused_rms_norm  # type: ignore[method-assign]
    llama.apply_rotary = fused_rotary
    llama.silu_and_mul = fused_silu_and_mul


def uninstall() -> None:
    if not _STOCK:
        return
    RMSNorm.forward = _STOCK["norm"]  # type: ignore[method-assign,assignment]
    llama.apply_rotary = _STOCK["rotary"]  # type: ignore[assignment]
    llama.silu_and_mul = _STOCK["act"]  # type: ignore[assignment]
    _STOCK.clear()


def check_against_stock(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Relative error of each fused op against the stock layer on random data."""
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    norm = RMSNorm(4096, 1e-5).to(device, dtype)
    norm.weight.data = rand(4096)
    x = rand(37, 4096)
    q, k = rand(37, 32, 128), rand(37, 8, 128)
    angles = torch.rand(37, 64, generator=generator, device=device) * 6
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    gate_up = rand(37, 2 * 1000)
    fq, fk = fused_rotary(q, k, cos, sin)
    sq, sk = stock_rotary(q, k, cos, sin)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    stock_norm = _STOCK.get("norm", RMSNorm.forward)
    return {"rms_norm": err(fused_rms_norm(norm, x), stock_norm(norm, x)),  # type: ignore[arg-type]
            "rotary": max(err(fq, sq), err(fk, sk)),
            "silu_and_mul": err(fused_silu_and_mul(gate_up),
                                torch.nn.functional.silu(gate_up[:, :1000]) * gate_up[:, 1000:])}
