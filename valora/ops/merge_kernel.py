"""In-place low-rank update of a weight matrix: ``W = round(W + alpha · B @ A)``.

This is the merge (and resync-mode unmerge) step of the orchestrator's ``WeightSwitcher``: ``W``
is ``[out, in]`` in bf16 / fp16 / fp32, ``B`` is ``[out, r]`` and ``A`` is ``[r, in]`` (any rank
``r >= 1``, any strides). Semantics, shared by both implementations:

- the product ``B @ A`` is accumulated in fp32 from the factors' own values (products of bf16 or
  fp16 values are exact in fp32), scaled by ``alpha``, added to ``W`` in fp32, and rounded to
  ``W``'s dtype **once**;
- ``W`` is read once and written once: the operation is memory-bound, its floor is
  ``2 · W.numel() · W.element_size()`` bytes over the device's copy bandwidth.

``lowrank_update_reference`` is the pure-PyTorch twin (fp32 row chunks, any device).
``lowrank_update_triton`` is one Triton launch of ``BLOCK_M × BLOCK_N`` output tiles; each program
loads its ``B`` rows and ``A`` columns (tiny, L2-resident across programs), forms the tile's delta
with one ``tl.dot`` over the padded rank and writes the rounded sum back. cuBLAS ``addmm_`` with
``beta = 1`` measured 2.3× the copy floor on an H200 for this shape of problem (a K ≤ 64 GEMM
that also reads ``C``), which is why this kernel exists.
"""

from __future__ import annotations

import torch

from valora.errors import ValoraError

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def check_lowrank_update(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
    """Raise ``ValoraError`` unless ``w [m, n] += b [m, r] @ a [r, n]`` is well formed."""
    if w.dim() != 2 or b.dim() != 2 or a.dim() != 2:
        raise ValoraError(f"lowrank update needs 2-D tensors, got w {tuple(w.shape)}, "
                          f"b {tuple(b.shape)}, a {tuple(a.shape)}")
    m, n = w.shape
    if b.shape[0] != m or a.shape[1] != n or b.shape[1] != a.shape[0] or a.shape[0] < 1:
        raise ValoraError(f"lowrank update shapes disagree: w {tuple(w.shape)}, "
                          f"b {tuple(b.shape)}, a {tuple(a.shape)}")
    if w.dtype not in _SUPPORTED:
        raise ValoraError(f"lowrank update: unsupported weight dtype {w.dtype}")
    if not (w.device == b.device == a.device):
        raise ValoraError(f"lowrank update: tensors on different devices "
                          f"({w.device}, {b.device}, {a.device})")


def lowrank_update_reference(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float,
                             chunk_elements: int = 1 << 24) -> None:
    """``w = round(w + alpha · b @ a)`` in place, in fp32 row chunks (the reference semantics)."""
    check_lowrank_update(w, b, a)
    a32 = a.float()
    rows = max(1, chunk_elements // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        stop = min(start + rows, w.shape[0])
        acc = w[start:stop].float()
        acc.addmm_(b[start:stop].float(), a32, alpha=alpha)
        w[start:stop].copy_(acc)


def lowrank_update_triton(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float,
                          block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None) -> None:
    """``w = round(w + alpha · b @ a)`` in place, one Triton launch (see module docstring).

    Tiles default by rank: 64×256 with 8 warps up to rank 32, else 64×128 with 4 warps — the
    best whole-model merges of a tile sweep on an H200 (``bench/orchestrator/merge_kernel_sweep.py``,
    ``bench/results/serve/merge-sweep-h200.jsonl``)."""
    check_lowrank_update(w, b, a)
    small = a.shape[0] <= 32
    block_m = block_m or 64
    block_n = block_n or (256 if small else 128)
    num_warps = num_warps or (8 if small else 4)
    if w.numel() == 0:
        return
    import triton

    from valora.ops.merge_kernel_impl import lowrank_update_kernel
    from valora.ops.triton_lora import kernels_interpreted

    # Both factors in one dtype for tl.dot: their own half type when they share it, else fp32
    # (exact for any input, with an IEEE fp32 dot rather than TF32).
    factor_dtype = a.dtype if a.dtype == b.dtype and a.dtype != torch.float32 else torch.float32
    a, b = a.to(factor_dtype), b.to(factor_dtype)
    m, n = w.shape
    rank = a.shape[0]
    upcast = factor_dtype != torch.float32 and kernels_interpreted()
    block_r = max(16, triton.next_power_of_2(rank))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    lowrank_update_kernel[grid](
        w, b, a, float(alpha), m, n, rank,
        w.stride(0), w.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION="ieee" if factor_dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        num_warps=num_warps)


def lowrank_update(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float,
                   backend: str = "auto") -> None:
    """Dispatch: ``"triton"`` (CUDA default when Triton is installed), ``"reference"``."""
    if backend == "auto":
        backend = "triton" if w.is_cuda and triton_available() else "reference"
    if backend == "triton":
        lowrank_update_triton(w, b, a, alpha)
    elif backend == "reference":
        lowrank_update_reference(w, b, a, alpha)
    else:
        raise ValoraError(f"unknown lowrank update backend {backend!r}")


def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None
