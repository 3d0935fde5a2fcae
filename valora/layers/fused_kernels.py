"""Triton kernels for the small per-layer ops of a decoder step, and their launchers.

Each replaces several PyTorch kernels with one launch (the PyTorch twins live in ``norm.py``,
``rotary.py`` and ``activation.py``; ``fused_select`` picks between the two). All arithmetic is
float32; results are rounded to the output dtype where the twin rounds, so in float32 the two
agree to a few ulps and in bf16/fp16 to one rounding step.

Semantics (``x32 = x.float()``; the last dimension of every tensor must have stride 1, other
strides are free)::

    rms_norm(x, w)          = w * (x32 * rsqrt(mean(x32², -1) + eps)).to(x.dtype)
    add_rms_norm(x, r, w)   = (rms_norm(s, w), s)   with  s = (x32 + r32).to(r.dtype)
    rotary(q, k, cos, sin)  = (q * cos + rotate_half(q) * sin,  k * cos + rotate_half(k) * sin)
                              q [T, H, D], k [T, KV, D], cos/sin [T, D]: one launch for both
    silu_and_mul(x)         = silu(x[..., :d]).to(x.dtype) * x[..., d:]     x [..., 2d]
    write_kv(k, v, kc, vc, s): kc[s[t]] = k[t].to(kc.dtype); vc[s[t]] = v[t].to(vc.dtype)
                              k, v [T, KV, D] (rows of KV·D contiguous elements), kc / vc the
                              caches viewed [slots, KV·D]: the one op that writes its inputs' target

Outputs are new contiguous tensors; inputs are never written (no aliasing with CUDA-graph input
buffers). Launchers do not check arguments: ``fused_select`` and the layers do.
"""

from __future__ import annotations

# mypy: disable-error-code="no-untyped-def"
import torch
import triton
import triton.language as tl

from valora.ops.launch import launcher

MAX_NORM_WIDTH = 65536  # one program holds a whole row in registers


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, width, eps,
                     stride_x, stride_r, stride_y, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``row``: one row of ``y`` (and of ``res_out`` when ``HAS_RESIDUAL``)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        total = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, total, mask=ok)
        x = total.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, num_q_heads, num_k_heads,
                   half, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(t, b)``: heads ``b·BLOCK_H ..`` of token ``t`` in the joint list [q heads, k
    heads]; outputs are contiguous ``[T, H, D]`` / ``[T, KV, D]``."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < half
    is_q = heads < num_q_heads
    k_head = heads - num_q_heads
    is_k = (k_head >= 0) & (k_head < num_k_heads)
    q_head = tl.where(is_q, heads, 0)[:, None]
    k_head = tl.where(is_k, k_head, 0)[:, None]
    mask_q = is_q[:, None] & d_ok[None, :]
    mask_k = is_k[:, None] & d_ok[None, :]
    cos_lo = tl.load(cos_ptr + token * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + token * stride_ct + half + d, mask=d_ok, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + token * stride_st + d, mask=d_ok, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + token * stride_st + half + d, mask=d_ok, other=0.0).to(tl.float32)
    q_in = q_ptr + token * stride_qt + q_head * stride_qh + d[None, :]
    k_in = k_ptr + token * stride_kt + k_head * stride_kh + d[None, :]
    lo = (tl.load(q_in, mask=mask_q, other=0.0).to(tl.float32)
          + tl.load(k_in, mask=mask_k, other=0.0).to(tl.float32))
    hi = (tl.load(q_in + half, mask=mask_q, other=0.0).to(tl.float32)
          + tl.load(k_in + half, mask=mask_k, other=0.0).to(tl.float32))
    out_lo = lo * cos_lo[None, :] - hi * sin_lo[None, :]
    out_hi = hi * cos_hi[None, :] + lo * sin_hi[None, :]
    width = 2 * half
    q_out = qo_ptr + token * num_q_heads * width + q_head * width + d[None, :]
    k_out = ko_ptr + token * num_k_heads * width + k_head * width + d[None, :]
    tl.store(q_out, out_lo.to(qo_ptr.dtype.element_ty), mask=mask_q)
    tl.store(q_out + half, out_hi.to(qo_ptr.dtype.element_ty), mask=mask_q)
    tl.store(k_out, out_lo.to(ko_ptr.dtype.element_ty), mask=mask_k)
    tl.store(k_out + half, out_hi.to(ko_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, e_ptr, width, stride_x, stride_y, stride_e,
                         BLOCK: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """Program ``(row, b)``: columns ``b·BLOCK ..`` of one output row. ``HAS_EXTRA``: the input
    is ``x + e``, rounded to the dtype first (as ``x.add_(e)`` would leave it)."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < width
    gate = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + col, mask=ok, other=0.0)
    if HAS_EXTRA:
        gate = (gate.to(tl.float32) + tl.load(e_ptr + row * stride_e + col, mask=ok,
                                              other=0.0).to(tl.float32)).to(gate.dtype)
        up = (up.to(tl.float32) + tl.load(e_ptr + row * stride_e + width + col, mask=ok,
                                          other=0.0).to(tl.float32)).to(up.dtype)
    gate = gate.to(tl.float32)
    up = up.to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + col, (act * up).to(y_ptr.dtype.element_ty), mask=ok)


def _next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python (Triton's is a ``ConstexprFunction``: ≈ 2 µs a
    call on the host, and these wrappers run once per layer and step)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _norm_warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rms_norm(x or x + residual), x + residual or None)`` for 2-D ``x``/``residual`` of one
    dtype. ``residual_out``: where the sum goes (``residual``'s shape and dtype, last dimension
    contiguous; may be ``residual`` itself: each row is read before it is written)."""
    rows, width = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(rows, width, dtype=out_dtype, device=x.device)
    res_out = None
    if residual is not None:
        res_out = torch.empty_like(residual) if residual_out is None else residual_out
    if rows:
        block = _next_power_of_2(width)
        res = residual if residual is not None else x
        res_o = res_out if res_out is not None else y
        launcher(_rms_norm_kernel)[(rows,)](
            x, res, weight, y, res_o, width,
            float(eps), x.stride(0), res.stride(0), y.stride(0), res_o.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_norm_warps(block))
    return y, res_out


def rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``query [T, H, D]`` and ``key [T, KV, D]`` (contiguous, one launch), written into
    ``q_out`` / ``k_out`` when given (contiguous, of the result's shape and dtype)."""
    tokens, num_q_heads, dim = query.shape
    num_k_heads = key.shape[1]
    out_dtype = torch.promote_types(query.dtype, cos.dtype)
    if q_out is None:
        q_out = torch.empty(tokens, num_q_heads, dim, dtype=out_dtype, device=query.device)
    if k_out is None:
        k_out = torch.empty(tokens, num_k_heads, dim, dtype=out_dtype, device=query.device)
    if tokens:
        half = dim // 2
        total = num_q_heads + num_k_heads
        block_h = min(16, _next_power_of_2(total))
        launcher(_rotary_kernel)[(tokens, _cdiv(total, block_h))](
            query, key, cos, sin, q_out, k_out, num_q_heads, num_k_heads, half,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            cos.stride(0), sin.stride(0),
            BLOCK_H=block_h, BLOCK_D=_next_power_of_2(half), num_warps=4)
    return q_out, k_out


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, width, stride_k, stride_v,
                     BLOCK: tl.constexpr):
    """Program ``t``: row ``t`` of ``k`` and of ``v`` into flat slot ``slot[t]`` of each cache."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    k = tl.load(k_ptr + token * stride_k + offs, mask=ok)
    v = tl.load(v_ptr + token * stride_v + offs, mask=ok)
    tl.store(kc_ptr + slot * width + offs, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + slot * width + offs, v.to(vc_ptr.dtype.element_ty), mask=ok)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Both caches' new rows in one launch (module Semantics); ``k_flat`` / ``v_flat``
    contiguous ``[slots, KV·D]``, ``key`` / ``value`` rows contiguous, ``slot_mapping [T]``
    distinct valid slots (as ``index_copy_`` wants them)."""
    tokens = key.shape[0]
    width = k_flat.shape[1]
    if tokens:
        launcher(_kv_write_kernel)[(tokens,)](
            key, value, k_flat, v_flat, slot_mapping, width, key.stride(0), value.stride(0),
            BLOCK=_next_power_of_2(width), num_warps=4 if width >= 1024 else 1)


def silu_and_mul(x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[:, :d]) * x[:, d:]`` for 2-D ``x [rows, 2d]``; with ``extra`` (``x``'s shape
    and dtype, rows of stride ``extra.stride(0)``, contiguous columns) of ``x + extra``."""
    rows, width = x.shape[0], x.shape[1] // 2
    y = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    if rows and width:
        block = min(1024, _next_power_of_2(width))
        launcher(_silu_and_mul_kernel)[(rows, _cdiv(width, block))](
            x, y, x if extra is None else extra, width, x.stride(0), y.stride(0),
            x.stride(0) if extra is None else extra.stride(0), BLOCK=block,
            HAS_EXTRA=extra is not None, num_warps=4 if block >= 512 else 1)
    return y
