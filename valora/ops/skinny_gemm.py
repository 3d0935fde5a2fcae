"""The base projections of a decode step as a Triton *skinny GEMM* instead of cuBLAS.

At decode sizes a projection is ``y = x Wᵀ (+ b)`` with few rows in ``x`` (the batch) and a
large ``W``: it is a stream of ``W``'s bytes. cuBLAS runs the 7B projections at batch 8–32 at
1.1–1.8× their bytes on an H200 (o 13.7 µs for 7.8 µs of bytes); this kernel, one program a
block of output columns holding every row of the batch, with the whole reduction in the program
and a software-pipelined ``K`` loop, took them 7–10 % closer per decode step
(``bench/results/ops/decode-gemm-h200-91164a8/``: 3.78 → 3.51 ms of projections at batch 32,
3.76 → 3.37 at batch 8) and lost from 64 rows up (qkv / gate_up), so it serves calls of at most
``SKINNY_MAX_TOKENS`` rows.

Semantics: ``skinny_linear(x, w, b) == F.linear(x, w, b)`` with fp32 accumulation, the result
in ``x``'s dtype (rounded once). Tiles: the GPU's tile table when ``valora tune-kernels
--skinny`` has profiled the call's shape there (``valora.ops.skinny_tuning``: entries
``"skinny:" + skinny_key``, which also say where cuBLAS won and stays), else ``skinny_tile``, the
measured winners per layer kind on the H200 — output widths ≥ 16384 take 64 columns a program,
reductions ≥ 8192 (down) 256-wide ``K`` chunks over 6 stages — with stages cut to fit the
shared memory.

``use_skinny_gemm`` decides per call: CUDA, fp16 / bf16, 2-D ``x`` with unit column stride, a
contiguous ``W`` (and bias, of the same dtype), 1 ≤ rows ≤ ``SKINNY_MAX_TOKENS``, and the switch
on for the device (``set_skinny_gemm``, else ``VALORA_SKINNY_GEMM``: ``1`` on, ``0`` off, unset /
``auto`` on for compute capability 9.0 and newer — Hopper, where it was measured; older GPUs
keep cuBLAS unless asked). Every other call is ``F.linear``. A tile's pipeline is cut to the device's shared memory
(``SMEM_BUDGET`` at most); a call no two-stage tile fits takes ``F.linear``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from valora.errors import ValoraError

SKINNY_MAX_TOKENS = 32
"""Most rows a skinny GEMM serves (module docstring: it lost to cuBLAS at 64)."""
SMEM_BUDGET = 200 * 1024
"""Shared memory a tile's pipeline may take (the H100 / H200 allow 227 KiB a block)."""
ENV_VAR = "VALORA_SKINNY_GEMM"

SWITCH_VALUES = ("auto", "0", "1")

_SWITCH: list[str | None] = [None]


@dataclass(frozen=True)
class SkinnyTile:
    """One launch's tile: ``block_n`` output columns a program, ``block_k`` of the reduction a
    pipeline stage, ``num_stages`` stages, ``num_warps`` warps; ``block_m`` covers the rows."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, element_size: int) -> int:
        """The pipeline's shared memory, counted as ``num_stages`` buffers of an ``x`` and a
        ``W`` tile each — an upper bound: Triton 3.x keeps ``num_stages - 1`` of them (it asked
        245760 B for 32×64×256 at 6 stages on an H200:
        ``bench/results/ops/decode-gemm-h200-91164a8/``)."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * element_size


def set_skinny_gemm(on: bool | None) -> None:
    """Use the skinny GEMM (True), never (False), or as by default (None: ``VALORA_SKINNY_GEMM``,
    else per device; benchmarks compare both in one process)."""
    _SWITCH[0] = None if on is None else ("1" if on else "0")


@contextlib.contextmanager
def skinny_gemm_forced(on: bool) -> Iterator[None]:
    """``set_skinny_gemm(on)`` inside the block, the switch as it was afterwards (a decode graph
    captured inside keeps the choice: ``CudaGraphRunner``'s few-adapter captures)."""
    saved = _SWITCH[0]
    set_skinny_gemm(on)
    try:
        yield
    finally:
        _SWITCH[0] = saved


def skinny_gemm_switch() -> str:
    """``set_skinny_gemm``'s value, else ``VALORA_SKINNY_GEMM``'s (``SWITCH_VALUES``), else
    ``"auto"``; another value is an error naming the choices."""
    value = _SWITCH[0]
    if value is None:
        env = os.environ.get(ENV_VAR, "auto")
        if env not in SWITCH_VALUES:
            raise ValoraError(f"{ENV_VAR}={env!r}: choose one of {SWITCH_VALUES}")
        value = _SWITCH[0] = env
    return value


def skinny_gemm_enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` may take the skinny GEMM (module docstring)."""
    value = skinny_gemm_switch()
    if value != "auto":
        return value == "1"
    return device.type == "cuda" and _capability(device)[0] >= 9


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=16)
def smem_limit(device: torch.device) -> int:
    """Shared memory a tile may take on ``device``: ``SMEM_BUDGET``, less on a GPU with less
    (the opt-in per-block limit, minus 8 KiB for the compiler's own), unbounded on the CPU."""
    if device.type != "cuda":
        return SMEM_BUDGET
    props = torch.cuda.get_device_properties(device)
    limit = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    return min(SMEM_BUDGET, limit - 8 * 1024) if limit > 0 else SMEM_BUDGET


def _pow2_at_least(value: int, floor: int) -> int:
    out = floor
    while out < value:
        out *= 2
    return out


def skinny_tile(num_tokens: int, out_features: int, in_features: int,
                element_size: int = 2, budget: int = SMEM_BUDGET) -> SkinnyTile | None:
    """The tile of a ``[num_tokens, in] × [out, in]ᵀ`` call (module docstring), its stages cut
    to ``budget`` bytes of shared memory; None when two stages do not fit."""
    block_m = _pow2_at_least(num_tokens, 16)
    if out_features >= 16384:
        tile = SkinnyTile(block_m, 64, 128, 4, 3)
    elif in_features >= 8192:
        tile = SkinnyTile(block_m, 32, 256, 4, 6)
    elif out_features >= 8192:
        tile = SkinnyTile(block_m, 32, 128, 4, 4)
    else:
        tile = SkinnyTile(block_m, 32, 256, 4, 4)
    stages = tile.num_stages
    while stages > 2 and tile.smem_bytes(element_size) > budget:
        stages -= 1
        tile = SkinnyTile(tile.block_m, tile.block_n, tile.block_k, tile.num_warps, stages)
    return tile if tile.smem_bytes(element_size) <= budget else None


SKINNY_PREFIX = "skinny:"
"""Key prefix of the skinny GEMM's entries in a GPU's tile table (``skinny_tuning``)."""


def skinny_token_bucket(num_tokens: int) -> int:
    """The rows a table entry covers: ``num_tokens`` rounded up to a power of two."""
    return _pow2_at_least(num_tokens, 1)


def skinny_key(num_tokens: int, in_features: int, out_features: int) -> str:
    """The table key of a call: its token bucket, exact widths."""
    return f"{SKINNY_PREFIX}t{skinny_token_bucket(num_tokens)}-i{in_features}-o{out_features}"


def tile_from_record(record: dict[str, object]) -> SkinnyTile | None:
    """A table record's tile when the skinny GEMM won there, else None (``F.linear``)."""
    tile = record.get("tile")
    if not record.get("use") or not isinstance(tile, dict):
        return None
    return SkinnyTile(**tile)


def select_skinny_tile(device: torch.device, num_tokens: int, out_features: int,
                       in_features: int, element_size: int = 2) -> SkinnyTile | None:
    """The tile of a call on ``device`` (module docstring: the GPU's table entry, else the
    heuristic), None where ``F.linear`` serves (cuBLAS won there, or no tile fits)."""
    return _select(device, num_tokens, out_features, in_features, element_size)


@functools.lru_cache(maxsize=1024)
def _select(device: torch.device, num_tokens: int, out_features: int, in_features: int,
            element_size: int) -> SkinnyTile | None:
    from valora.ops.tile_table import table_for_device

    record = None
    if device.type == "cuda":
        table = table_for_device(torch.cuda.get_device_name(device))
        record = table.entries.get(skinny_key(num_tokens, in_features, out_features))
    return resolve_skinny_tile(record, num_tokens, out_features, in_features, element_size,
                               smem_limit(device))


def resolve_skinny_tile(record: dict[str, object] | None, num_tokens: int, out_features: int,
                        in_features: int, element_size: int = 2,
                        budget: int = SMEM_BUDGET) -> SkinnyTile | None:
    """A call's tile given its table record (None: not tuned → ``skinny_tile``): the record's
    tile where the skinny GEMM won and it fits (its rows and ``budget``), else None."""
    if record is None:
        return skinny_tile(num_tokens, out_features, in_features, element_size, budget)
    tile = tile_from_record(record)
    if tile is None or tile.block_m < num_tokens or tile.smem_bytes(element_size) > budget:
        return None
    return tile


def _call_tile(x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> SkinnyTile | None:
    """The skinny tile of this call when it takes the skinny GEMM (module docstring), else None."""
    if not (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_TOKENS
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.stride(1) == 1 and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()
                                  and bias.shape == (weight.shape[0],)))
            and skinny_gemm_enabled(x.device)):
        return None
    return select_skinny_tile(x.device, x.shape[0], weight.shape[0], weight.shape[1],
                              x.element_size())


def use_skinny_gemm(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> bool:
    """Whether ``base_linear`` takes the skinny GEMM for this call (module docstring)."""
    return _call_tile(x, weight, bias) is not None


def base_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the skinny GEMM where it serves."""
    tile = _call_tile(x, weight, bias)
    if tile is not None:
        return _run(x, weight, bias, tile)  # _call_tile checked what skinny_linear checks
    return F.linear(x, weight, bias)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: SkinnyTile | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` by the skinny GEMM (module docstring), any rows / device the
    Triton build runs on (the CPU interpreter included); ``tile`` overrides ``skinny_tile``."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValoraError(f"skinny GEMM: shapes {tuple(x.shape)} × {tuple(weight.shape)}ᵀ")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValoraError("skinny GEMM: x needs unit column stride and weight contiguity")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValoraError(f"skinny GEMM: bias of shape {tuple(bias.shape)}")
    num_tokens, in_features = x.shape
    if num_tokens == 0:
        return torch.empty(0, weight.shape[0], dtype=x.dtype, device=x.device)
    cfg = tile or skinny_tile(num_tokens, weight.shape[0], in_features, x.element_size(),
                              smem_limit(x.device))
    if cfg is None:
        raise ValoraError(f"skinny GEMM: no tile for {num_tokens} rows fits the shared memory")
    return _run(x, weight, bias, cfg)


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         tile: SkinnyTile) -> torch.Tensor:
    """The launch on checked arguments (``skinny_linear``'s checks, ≥ 1 row)."""
    from valora.ops.skinny_gemm_kernel import launch_skinny_gemm  # Triton only when it runs

    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    launch_skinny_gemm(x, weight, bias, y, tile)
    return y


TileOf = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "SkinnyTile | None"]
"""``(x, weight, bias) -> tile or None``: a call's choice (``_call_tile`` in the engine)."""


def row_class(rows: int) -> tuple[bool, bool]:
    """What the kernel's binary depends on in its row count (Triton's integer specialisation):
    whether it is 1 and whether it is a multiple of 16."""
    return rows == 1, rows % 16 == 0


def skinny_warm_up_plan(linears: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                        tile_of: TileOf | None = None
                        ) -> list[tuple[torch.Tensor, torch.Tensor | None, int, SkinnyTile]]:
    """One ``(weight, bias, rows, tile)`` per binary the skinny GEMM can run on these weights
    for 1 … ``SKINNY_MAX_TOKENS`` rows: a binary is keyed by the weight's shape and dtype,
    the bias's presence, the tile and the rows' ``row_class``; rows the choice sends to
    ``F.linear`` add none."""
    choose = tile_of or _call_tile
    kinds: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
    for weight, bias in linears:  # the layers of a model share a few kinds: ask once a kind
        kinds.setdefault((tuple(weight.shape), weight.dtype, weight.device, bias is not None),
                         (weight, bias))
    plan: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor | None, int, SkinnyTile]] = {}
    for kind, (weight, bias) in kinds.items():
        x = torch.zeros(SKINNY_MAX_TOKENS, weight.shape[1], dtype=weight.dtype,
                        device=weight.device)
        for rows in range(1, SKINNY_MAX_TOKENS + 1):
            tile = choose(x[:rows], weight, bias)
            if tile is not None:
                plan.setdefault((*kind, tile, row_class(rows)), (weight, bias, rows, tile))
    return list(plan.values())


def warm_up_skinny_gemm(linears: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                        device: torch.device, threads: int = 0,
                        tile_of: TileOf | None = None) -> int:
    """Compile every binary of ``skinny_warm_up_plan`` by one launch on zeros (the weights are
    only read), on ``warm_up_threads`` workers as the LoRA warm-up; returns the launches. On the
    CPU nothing takes the skinny GEMM unless ``tile_of`` says so (tests)."""
    from valora.ops.warmup import run_launches, warm_up_threads

    plan = skinny_warm_up_plan(linears, tile_of)
    launches: list[Callable[[], None]] = [
        functools.partial(_warm_launch, weight, bias, rows, tile)
        for weight, bias, rows, tile in plan]
    run_launches(launches, device, warm_up_threads(device, threads))
    if device.type == "cuda" and launches:
        torch.cuda.synchronize(device)
    return len(launches)


def _warm_launch(weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                 tile: SkinnyTile) -> None:
    x = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    skinny_linear(x, weight, bias, tile)
