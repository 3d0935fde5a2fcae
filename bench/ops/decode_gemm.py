"""How far from the copy rate do the base projections of a decode step run, and can a Triton
skinny GEMM close the gap?

At batch 32 the 7B decode step's base GEMMs (cuBLAS through ``F.linear``) take ≈ 117 µs a layer
against ≈ 94 µs of weight bytes (``bench/results/ops/dense-pool-h200-e5a420a/``: o 14.7 µs for
7.8 µs of bytes); with the LoRA tax that is what keeps the 32-adapter bar of issue 4 out of
reach. This times, per projection at LLaVA-1.5-7B widths (o, qkv, gate_up, down) and batch 8 /
32 / 64, under CUDA graphs with the weight rotated past L2:

- ``cublas``: ``F.linear`` as the model calls it;
- ``cublaslt``: the same with ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
- ``triton``: a skinny GEMM (one program a block of output columns, the whole reduction in the
  program, a software-pipelined ``K`` loop; ``block_m`` the batch rounded up to 16) over a grid
  of tiles, the best per point — checked against ``F.linear`` first.

    python bench/ops/decode_gemm.py --out $OUT/decode_gemm.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import json
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from decode_experiment import setup

from valora.ops.timing import time_calls

SHAPES = {"o": (4096, 4096), "qkv": (4096, 12288), "gate_up": (4096, 22016),
          "down": (11008, 4096)}
TINY_SHAPES = {"o": (64, 64), "down": (96, 32)}
BATCHES = (8, 32, 64)
TILES = [(n, k, w, s) for n, k, w, s in product((16, 32, 64), (128, 256), (4, 8), (3, 4, 6))]
"""(block_n, block_k, num_warps, num_stages)."""
L2_BYTES = 150 << 20


@triton.jit
def _skinny_gemm(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[:, cols] = x @ w[cols, :]ᵀ`` for one block of output columns, fp32 accumulation."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += tl.dot(x, w)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, tile: tuple) -> None:
    block_n, block_k, warps, stages = tile
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    _skinny_gemm[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def gemm_problem(batch: int, in_f: int, out_f: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Copies of a random weight ``[out, in]`` (enough, ≤ 8, to rotate past L2), an input
    ``[batch, in]`` and an output buffer ``[batch, out]``."""
    copies = max(1, min(8, -(-L2_BYTES // (2 * in_f * out_f))))
    weights = [torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f ** 0.5
               for _ in range(copies)]
    x = torch.randn(batch, in_f, device=device, dtype=dtype)
    return weights, x, torch.empty(batch, out_f, device=device, dtype=dtype)


def time_point(name: str, batch: int, in_f: int, out_f: int, device: torch.device,
               dtype: torch.dtype, rate: float, tiles: list) -> dict[str, Any]:
    w_bytes = 2 * in_f * out_f
    weights, x, y = gemm_problem(batch, in_f, out_f, device, dtype)
    copies = len(weights)
    want = F.linear(x, weights[0])
    row: dict[str, Any] = {"layer": name, "batch": batch, "in": in_f, "out": out_f,
                           "copies": copies, "floor_us": w_bytes / rate * 1e6, "us": {},
                           "errors": {}}

    def timed(label: str, call) -> None:
        try:
            row["us"][label] = time_calls([lambda i=i: call(i) for i in range(copies)], device,
                                          repeats=10).median_us
        except Exception as error:
            row["errors"][label] = f"{type(error).__name__}: {error}"[:300]

    timed("cublas", lambda i: torch.mm(x, weights[i].t(), out=y))
    if device.type == "cuda":
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        timed("cublaslt", lambda i: torch.mm(x, weights[i].t(), out=y))
        torch.backends.cuda.preferred_blas_library(before)
    for tile in tiles:
        label = "triton n{} k{} w{} s{}".format(*tile)
        try:
            skinny_gemm(x, weights[0], y, tile)
        except Exception as error:
            row["errors"][label] = f"{type(error).__name__}: {error}"[:300]
            continue
        diff = (y.float() - want.float()).abs().max().item()
        if diff > 2e-2 * max(1.0, want.float().abs().max().item()):
            row["errors"][label] = f"differs from F.linear by {diff:.3g}"
            continue
        timed(label, lambda i, tile=tile: skinny_gemm(x, weights[i], y, tile))
    return row


def main() -> None:
    run = setup(__doc__ or "")
    args, device, dtype, rate, name = run.args, run.device, run.dtype, run.rate, run.name
    shapes = TINY_SHAPES if args.tiny else SHAPES
    batches = (4,) if args.tiny else BATCHES
    tiles = TILES[:2] if args.tiny else TILES
    step: dict[int, dict[str, float]] = {}
    with args.out.open("w") as sink:
        for batch in batches:
            for layer, (in_f, out_f) in shapes.items():
                row = time_point(layer, batch, in_f, out_f, device, dtype, rate, tiles)
                row.update(device=name, git_sha=args.sha)
                sink.write(json.dumps(row) + "\n")
                us = row["us"]
                best = min((k for k in us if k.startswith("triton")), key=us.__getitem__,
                           default=None)
                cells = {"floor": row["floor_us"], "cublas": us.get("cublas", 0.0),
                         "cublaslt": us.get("cublaslt", 0.0),
                         "triton": us[best] if best else 0.0}
                total = step.setdefault(batch, {})
                for k, v in cells.items():
                    total[k] = total.get(k, 0.0) + v
                print(f"batch {batch:>3} {layer:<8} " + " | ".join(
                    f"{k} {v:6.1f}" for k, v in cells.items()) + f" ({best}) | errors "
                    f"{len(row['errors'])}", flush=True)
    for batch, total in step.items():
        print(f"batch {batch}: per decode step (32 layers), ms: " + ", ".join(
            f"{k} {32 * v / 1e3:.3f}" for k, v in total.items()))


if __name__ == "__main__":
    main()
