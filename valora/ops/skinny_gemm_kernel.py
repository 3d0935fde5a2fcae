"""The Triton kernel of ``valora.ops.skinny_gemm`` (imported when first launched, so the module
above stays importable without Triton)."""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from valora.ops.triton_lora import dot_flags

if TYPE_CHECKING:
    from valora.ops.skinny_gemm import SkinnyTile


@triton.jit
def skinny_accumulate(x_rows, w_cols, m_ok, n_ok, K, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
    """The skinny GEMM's fp32 accumulator: ``x_rows`` (``[BLOCK_M, 1]`` row pointers, masked by
    ``m_ok``) against ``w_cols`` (``[1, BLOCK_N]`` weight-row pointers, masked by ``n_ok``) over
    the whole ``K`` in one pipelined loop. Inlined by Triton: the kernels calling it compile as
    if the loop were written there (the GEMM + LoRA experiments of ``bench/ops`` share it)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``y[:, cols] = x @ w[cols, :]ᵀ (+ b[cols])`` for one block of ``BLOCK_N`` output columns
    and all ``M`` ≤ ``BLOCK_M`` rows; fp32 accumulation over the whole ``K``. ``M`` keeps
    Triton's integer specialisation (``M == 1``, ``M % 16 == 0``): one binary per layer shape,
    ``BLOCK_M`` and row class (``row_class``); left unspecialised it cost 1.3–1.7 % of the 7B
    projections' time at 1 and 16 rows (``bench/results/ops/skinny-specialise-h200-e9a1397/``).
    ``PRECISION`` / ``UPCAST`` as the LoRA kernels' (``triton_lora.dot_flags``: exact fp32, bf16
    multiplied in fp32 by the CPU interpreter)."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = skinny_accumulate(x_ptr + rm[:, None].to(tl.int64) * stride_xm,
                            w_ptr + rn[None, :].to(tl.int64) * stride_wn, m_ok, n_ok, K,
                            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def launch_skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       y: torch.Tensor, tile: SkinnyTile) -> None:
    """One launch writing ``y`` (checked by ``skinny_linear``)."""
    num_tokens, in_features = x.shape
    out_features = weight.shape[0]
    grid = (triton.cdiv(out_features, tile.block_n),)
    _skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else y, y, num_tokens, out_features, in_features,
        x.stride(0), weight.stride(0), y.stride(0), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, HAS_BIAS=bias is not None, **dot_flags(x.dtype),
        num_warps=tile.num_warps,
        num_stages=tile.num_stages)
