"""Profiled tiles for the skinny GEMM (``valora.ops.skinny_gemm``), per GPU, beside the LoRA tiles.

``valora tune-kernels --skinny`` times, for every ``--tokens`` count up to ``SKINNY_MAX_TOKENS``
and every ``--layers`` shape (``out`` = the sum of the widths), ``F.linear`` (cuBLAS) and every
candidate tile of ``skinny_candidates`` that fits the device's shared memory, under CUDA graphs
with the weight rotated past L2, and stores under ``"skinny:" + skinny_key`` in the GPU's table::

    {"use": true, "tile": {"block_m": 32, "block_n": 32, ...},
     "time_us": {"skinny": …, "cublas": …}}

``use`` is false where cuBLAS was faster: such calls keep ``F.linear`` on that GPU. At run time
``skinny_gemm.select_skinny_tile`` reads the entry of a call's token bucket (rows rounded up to a
power of two) and shape; a GPU or shape without one takes the measured H200 heuristic
(``skinny_gemm.skinny_tile``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from itertools import product

import torch
import torch.nn.functional as F

from valora.ops.skinny_gemm import (
    SMEM_BUDGET,
    SkinnyTile,
    skinny_linear,
    skinny_tile,
    skinny_token_bucket,
)
from valora.ops.timing import rotations_for, time_calls


def skinny_candidates(num_tokens: int, element_size: int = 2,
                      budget: int = SMEM_BUDGET) -> list[SkinnyTile]:
    """Tiles to time for ``num_tokens`` rows: 16–128 columns, 64–256-wide ``K`` chunks, 4 / 8
    warps, 2–6 stages, those whose pipeline fits ``budget`` (``SkinnyTile.smem_bytes``); the
    heuristic's tile first."""
    block_m = max(16, skinny_token_bucket(num_tokens))
    tiles = [SkinnyTile(block_m, n, k, w, s)
             for n, k, w, s in product((16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4, 6))]
    return [t for t in tiles if t.smem_bytes(element_size) <= budget]


def _skinny_call(x: torch.Tensor, tile: SkinnyTile, weight: torch.Tensor) -> torch.Tensor:
    return skinny_linear(x, weight, None, tile)


def tune_skinny(num_tokens: int, in_features: int, out_features: int, dtype: torch.dtype,
                device: torch.device, max_candidates: int = 0, repeats: int = 10,
                budget: int = SMEM_BUDGET) -> dict[str, object]:
    """The table record of one shape (module docstring). ``max_candidates`` > 0 keeps the first
    ones (the heuristic's first)."""
    element = torch.tensor([], dtype=dtype).element_size()
    generator = torch.Generator(device=device).manual_seed(num_tokens * 7919 + out_features)
    rotations = rotations_for(element * out_features * in_features)
    weights = [torch.randn(out_features, in_features, generator=generator, device=device,
                           dtype=torch.float32).to(dtype) for _ in range(rotations)]
    x = torch.randn(num_tokens, in_features, generator=generator, device=device,
                    dtype=torch.float32).to(dtype)
    heuristic = skinny_tile(num_tokens, out_features, in_features, element, budget)
    candidates = skinny_candidates(num_tokens, element, budget)
    if heuristic is not None:
        candidates = [heuristic] + [t for t in candidates if t != heuristic]
    if max_candidates > 0:
        candidates = candidates[:max_candidates]

    def median_us(call: Callable[[torch.Tensor], object]) -> float:
        return time_calls([partial(call, w) for w in weights], device, repeats=repeats).median_us

    cublas = median_us(partial(F.linear, x))
    times: dict[SkinnyTile, float] = {}
    for tile in candidates:
        try:
            times[tile] = median_us(partial(_skinny_call, x, tile))
        except Exception:  # a tile the device cannot run (resources) is no candidate
            continue
    record: dict[str, object] = {"use": False, "time_us": {"cublas": round(cublas, 3)}}
    if times:
        best = min(times, key=times.__getitem__)
        record["tile"] = asdict(best)
        record["time_us"] = {"skinny": round(times[best], 3), "cublas": round(cublas, 3)}
        record["use"] = times[best] < cublas
    return record
