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

    Tiles default by rank: 32×128 up to rank 32, else 64×128, 4 warps — the best whole-model
    merges of a graph-timed tile sweep on an H200 (1.17× / 1.31× the copy floor;
    ``bench/orchestrator/merge_kernel_sweep.py``, ``bench/results/serve/merge-sweep-graphs-h200.jsonl``).
    Programs that walked several column tiles with the next ``W`` tile loaded ahead were
    measured in the same sweep and lost (1.32–2.2×); they were removed."""
    check_lowrank_update(w, b, a)
    factor_dtype = a.dtype if a.dtype == b.dtype and a.dtype != torch.float32 else torch.float32
    _launch(w, b.to(factor_dtype), a.to(factor_dtype), alpha, a.shape[0], None, None,
            block_m, block_n, num_warps)


def lowrank_update_slot(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                        scale: torch.Tensor, rank: torch.Tensor, sign: float = 1.0) -> None:
    """``w = round(w + sign·scale · b[:, :r] @ a[:r])`` in place with ``r = min(rank, a.shape[0])``,
    one Triton launch that reads ``scale`` (fp32) and ``rank`` (int32) — one-element tensors,
    a LoRA slot's entries — on the device, so the launch captured in a CUDA graph stays right when
    the slot is given another adapter. ``b`` / ``a`` are the slot's factor storage at full
    storage rank (same dtype as ``w``); rank 0 leaves ``w`` untouched (not even read)."""
    check_lowrank_update(w, b, a)
    if b.dtype != w.dtype or a.dtype != w.dtype or w.dtype == torch.float32:
        raise ValoraError("lowrank_update_slot needs half-precision factors of w's dtype")
    if scale.numel() != 1 or rank.numel() != 1 or rank.dtype != torch.int32 \
            or scale.dtype != torch.float32:
        raise ValoraError("lowrank_update_slot: scale (float32) and rank (int32) are 1 element")
    _launch(w, b, a, sign, a.shape[0], scale, rank, None, None, None)


def _launch(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, alpha: float, rank: int,
            scale: torch.Tensor | None, rank_ref: torch.Tensor | None,
            block_m: int | None, block_n: int | None, num_warps: int | None) -> None:
    if w.numel() == 0:
        return
    import triton

    from valora.ops.launch import launcher
    from valora.ops.merge_kernel_impl import lowrank_update_kernel
    from valora.ops.triton_lora import kernels_interpreted

    small = rank <= 32
    block_m = block_m or (32 if small else 64)
    block_n = block_n or 128
    num_warps = num_warps or 4
    m, n = w.shape
    upcast = a.dtype != torch.float32 and kernels_interpreted()
    block_r = max(16, triton.next_power_of_2(rank))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    from_memory = scale is not None and rank_ref is not None
    launcher(lowrank_update_kernel)[grid](
        w, b, a, scale if from_memory else w, rank_ref if from_memory else w, float(alpha), m, n,
        rank, w.stride(0), w.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION="ieee" if a.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        FROM_MEMORY=from_memory, num_warps=num_warps)


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
