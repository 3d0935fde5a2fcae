"""The ``"triton"`` LoRA backend: launcher with checks around ``valora.ops.lora_kernels``.

Semantics (identical to ``valora.ops.reference.lora_apply_reference``; ``y`` updated in place)::

    for t in range(T):
        s = token_slots[t]
        if s < 0: continue
        for j, w in enumerate(slice_widths):
            r, off = min(ranks[s, j], R), sum(slice_widths[:j])
            y[t, off:off+w] += scale_multiplier * scales[s, j] * (
                (x[t] @ lora_a[s, j, :r].T) @ lora_b[s, off:off+w, :r].T)

computed as two launches: shrink into an fp32 buffer ``h[split_k, T, J·R]`` and expand (which
sums the K splits, scales, and adds into ``y``). fp16 / bf16 / fp32 inputs, fp32 accumulation;
the rank-space product is rounded to the input dtype before the expand product (as every
tensor-core LoRA kernel does). Neither ``prepare_lora_triton`` nor ``lora_apply_triton``
synchronises with the GPU: grids come from (T, S, shapes) and host-side hints only, and are
CUDA-graph capturable once each kernel configuration has been compiled (run the call once before
capturing).
On the CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests).

Mixed mode in one op (a batch with ``correction_slots``, ``valora.ops.lora``): the same two
launches with ``CORRECTION`` set; ``h`` is ``[split_k, T, 2·J·R]`` (the tokens' own rank space,
then the merged slot's), the segments add the correction-only group, and the merged slot is
read on the device (``LoRASegments.correction``). With host-known slots, the effective rank is
taken over the active slots and the merged slot together, and the shrink grid covers the own
half whole plus the merged slot's live prefix of the second half.

Effective rank. When the host knows the batch's slots (``LoRASegments.active_slots``) and the
layer keeps its rank mirror (``LoRASlotWeights.ranks_cpu``), ``active_slice_ranks`` gives per
slice ``r_j = max over active slots of min(ranks_cpu[s][j], R)`` in O(active slots × slices)
host work (no device read); the batch's *effective rank* is ``max_j r_j``. Otherwise (CUDA-graph
batches, no mirror) everything below uses the storage rank ``R``, exactly as before.

- Tile choice: keyed by ``tile_rank(effective rank, R)`` (its rank bucket, at least 1, at most
  ``R``) instead of ``R``. Correctness never depends on the configuration: both kernels read
  each slot's rank from the device ``ranks`` and mask / loop over rank blocks up to it for any
  block sizes and split, and ``h`` keeps its storage layout ``[split_k, T, J·R]``.
- Effective rank 0 (no active slot targets any slice of this layer): nothing is launched; the
  kernels' programs would all return before touching memory, so ``y`` is the same.
- The shrink grid covers the flat rank prefix ``[0, L)``, ``L = max_{j: r_j>0} (j·R + r_j)``,
  instead of ``[0, J·R)``: a dropped rank block holds only ``n = j·R + ρ ≥ L`` with
  ``ρ ≥ r_j ≥ ranks[s, j]`` for every active ``s``, i.e. programs that would return at once, and
  the expand reads only ``h[.., j·R + ρ]`` with ``ρ < ranks[s, j]``, inside ``[0, L)``.

The last two rest on the host facts bounding the device ones: ``active_slots`` covers every
token's slot (derived or checked by ``prepare_lora_batch``) and ``min(ranks[s, j], R) ≤
ranks_cpu[s][j]`` for those slots (``valora.lora.slot_writer.SlotWriter`` keeps the mirror equal;
the reference backend and slot merging rely on it alike). The tile choice rests on nothing. A
CUDA graph must be captured with unknown slots (``active_slots`` None, as
``LoRASegments.update(slots)`` leaves them): a capture would bake the skip and the trimmed grid
into replays of other slots.
"""

from __future__ import annotations

import torch

from valora.errors import ValoraError
from valora.ops.launch import launcher
from valora.ops.lora import LoRABatch, LoRASlotWeights
from valora.ops.lora_expand_persistent import launch_expand_persistent
from valora.ops.lora_kernels import lora_expand_kernel, lora_shrink_kernel
from valora.ops.lora_launch_args import (
    cdiv,
    expand_b_layout,
    expand_split_constexpr,
    persistent_expand_serves,
    shrink_split,
    slice_groups,
)
from valora.ops.lora_segments import LoRASegments
from valora.ops.pdl import pdl_flags, pdl_levels
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig
from valora.ops.tile_table import select_tile_config, tile_rank

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


def kernels_interpreted() -> bool:
    """True when Triton runs the kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return type(lora_shrink_kernel).__name__ == "InterpretedFunction"


def prepare_lora_triton(batch: LoRABatch) -> LoRASegments:
    """The backend's prepare step: slot-sorted token order and tile lists, on the device (with
    the correction's group and merged slot for a mixed-mode batch)."""
    correction = batch.correction_slots
    segments = LoRASegments.allocate(int(batch.token_slots.shape[0]), batch.num_slots,
                                     batch.token_slots.device, batch.num_active_slots,
                                     batch.active_slots, with_correction=correction is not None)
    segments.update(batch.token_slots, batch.num_active_slots, batch.active_slots,
                    correction, batch.correction_slot)
    return segments


def _check(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
           segments: LoRASegments) -> None:
    """Raise ``ValoraError`` for any input the kernels cannot take (module docstring). The
    common, valid case is one compound test (this runs once per layer and step on the host);
    the detailed checks run only to name what is wrong."""
    a, b, ranks, scales = weights.lora_a, weights.lora_b, weights.ranks, weights.scales
    dtype, device = x.dtype, x.device
    shape = a.shape
    if (dtype in SUPPORTED_DTYPES and y.dtype is dtype and a.dtype is dtype and b.dtype is dtype
            and ranks.dtype is torch.int32 and scales.dtype is torch.float32
            and y.device == device and a.device == device and b.device == device
            and ranks.device == device and scales.device == device
            and segments.tiles.device == device and len(shape) == 4
            and b.shape == (shape[0], sum(weights.slice_widths), shape[2])
            and shape[1] == len(weights.slice_widths)
            and ranks.shape == shape[:2] and scales.shape == shape[:2]
            and shape[0] >= segments.num_slots and x.shape[0] == segments.num_tokens
            and a.is_contiguous() and (b.is_contiguous() or b.transpose(1, 2).is_contiguous())
            and ranks.is_contiguous()
            and scales.is_contiguous()
            and (device.type == "cuda" or kernels_interpreted())):
        return
    _explain(y, x, weights, segments)


def _explain(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
             segments: LoRASegments) -> None:
    """The detailed checks behind ``_check``: raises with what is wrong."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValoraError(f"triton LoRA: dtype {x.dtype} not supported ({SUPPORTED_DTYPES})")
    named = {"y": y, "lora_a": weights.lora_a, "lora_b": weights.lora_b}
    for name, tensor in named.items():
        if tensor.dtype != x.dtype:
            raise ValoraError(f"triton LoRA: {name} is {tensor.dtype} but x is {x.dtype}")
    if weights.ranks.dtype != torch.int32 or weights.scales.dtype != torch.float32:
        raise ValoraError("triton LoRA: ranks must be int32 and scales float32")
    for name, tensor in {**named, "ranks": weights.ranks, "scales": weights.scales,
                         "segments": segments.tiles}.items():
        if tensor.device != x.device:
            raise ValoraError(f"triton LoRA: {name} on {tensor.device}, x on {x.device}")
    if weights.lora_a.dim() != 4:
        raise ValoraError(f"triton LoRA: lora_a must be [slots, slices, rank, in], got "
                          f"{tuple(weights.lora_a.shape)}")
    num_slots, num_slices, max_rank, _ = weights.lora_a.shape
    if (weights.lora_b.shape != (num_slots, sum(weights.slice_widths), max_rank)
            or num_slices != len(weights.slice_widths)
            or weights.ranks.shape != (num_slots, num_slices)
            or weights.scales.shape != (num_slots, num_slices)):
        raise ValoraError(
            f"triton LoRA: inconsistent slot weights: A {tuple(weights.lora_a.shape)}, "
            f"B {tuple(weights.lora_b.shape)}, ranks {tuple(weights.ranks.shape)}, "
            f"scales {tuple(weights.scales.shape)}, slices {weights.slice_widths}")
    if num_slots < segments.num_slots:
        raise ValoraError(f"triton LoRA: batch addresses {segments.num_slots} slots, "
                          f"weights hold {num_slots}")
    for name, tensor in {"lora_a": weights.lora_a, "ranks": weights.ranks,
                         "scales": weights.scales}.items():
        if not tensor.is_contiguous():
            raise ValoraError(f"triton LoRA: {name} must be contiguous (slot storage)")
    if not (weights.lora_b.is_contiguous() or weights.b_rank_major):
        raise ValoraError("triton LoRA: lora_b must be contiguous or rank-major (the transpose of "
                          "a contiguous [slots, rank, out]: valora.ops.lora)")
    if x.shape[0] != segments.num_tokens:
        raise ValoraError(f"triton LoRA: {x.shape[0]} tokens, segments for {segments.num_tokens}")
    if x.device.type != "cuda" and not kernels_interpreted():
        raise ValoraError(
            "triton LoRA runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
    raise ValoraError(f"triton LoRA: unsupported inputs: x {tuple(x.shape)} {x.dtype} on "
                      f"{x.device}, y {tuple(y.shape)} {y.dtype}")


def active_slice_ranks(weights: LoRASlotWeights, segments: LoRASegments
                       ) -> tuple[int, ...] | None:
    """``r_j`` per slice over the slots the batch reads (``LoRASegments.read_slots``: its active
    slots and a correction's merged slot; module docstring, "Effective rank"); None when the host
    does not know them or the layer keeps no rank mirror."""
    slots = segments.read_slots  # the merged slot's ranks count too (with a correction)
    return None if slots is None else weights.active_slice_ranks(slots)


def live_flat_rank(slice_ranks: tuple[int, ...], max_rank: int) -> int:
    """``L = max_{j: r_j > 0} (j·R + r_j)`` (0 when every ``r_j`` is 0): the prefix of the flat
    rank axis ``n = j·R + ρ`` holding every entry the batch's slots can use."""
    return max((j * max_rank + min(r, max_rank) for j, r in enumerate(slice_ranks) if r > 0),
               default=0)


def choose_tile_config(x: torch.Tensor, weights: LoRASlotWeights, segments: LoRASegments,
                       slice_ranks: tuple[int, ...] | None) -> tuple[TileConfig, str]:
    """The call's tile configuration and its source (``select_tile_config``), keyed by the
    batch's effective rank ``max(slice_ranks)`` when known, else by the storage rank — and then,
    the host knowing nothing of the slots (CUDA-graph segments), by the bucket's mix entry when
    the table has one (``tile_table``: tiles for every batch a replay may carry)."""
    storage = weights.max_rank
    rank = storage if slice_ranks is None else tile_rank(max(slice_ranks, default=0), storage)
    active = segments.num_active_slots
    # Unknown adapter count (graph-captured segments): the worst case, one per token.
    worst = min(x.shape[0], segments.num_slots)
    return select_tile_config(x.device, x.shape[0], rank, x.shape[1], weights.slice_widths,
                              active if active > 0 else worst, storage_rank=storage,
                              mix=segments.read_slots is None and slice_ranks is None)


def lora_apply_triton(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
                      batch: LoRABatch, scale_multiplier: float = 1.0,
                      config: TileConfig | None = None) -> None:
    """``y += LoRA(x)`` (module Semantics). ``config`` overrides the table lookup (tuning).

    Tiles follow the batch's effective rank when the host knows it; the result does not depend
    on the tiles (module docstring, "Effective rank"). The choice is made once per step and
    layer shape: ``LoRASegments.launch_plans`` keeps it for the step's other layers of that
    shape and slice ranks (every decoder layer, in the usual case of adapters that target the
    same modules in every layer)."""
    segments = batch.backend_data
    if not isinstance(segments, LoRASegments):
        raise ValoraError("triton LoRA: batch was not prepared by the triton backend")
    _check(y, x, weights, segments)
    if x.shape[0] == 0 or segments.num_slots == 0:
        return
    slice_ranks = active_slice_ranks(weights, segments)
    if config is None:
        merged = (None if segments.correction_slot is None
                  else weights.active_slice_ranks((segments.correction_slot,)))
        key = (x.shape[1], weights.lora_a.shape, weights.slice_widths, slice_ranks, merged)
        plan = segments.launch_plans.get(key)
        if plan is None:
            plan = segments.launch_plans[key] = _plan(x, weights, segments, slice_ranks)
        config, live = plan
    else:
        live = _live(weights, segments, slice_ranks)
    if live == 0:
        return  # no active slot targets this layer: every program would return at once
    if x.stride(1) != 1:
        x = x.contiguous()
    target = y if y.stride(1) == 1 else y.contiguous()
    shrink_pdl, expand_pdl, shrink_launch = pdl_levels(x.device)  # (0, 0, False): plain
    h = launch_shrink(x, weights, segments, config.shrink, live, pdl=shrink_pdl,
                      pdl_launch=shrink_launch)
    launch_expand(h, target, weights, segments, config.expand, scale_multiplier, pdl=expand_pdl)
    if target is not y:
        y.copy_(target)


def _plan(x: torch.Tensor, weights: LoRASlotWeights, segments: LoRASegments,
          slice_ranks: tuple[int, ...] | None) -> tuple[TileConfig, int | None]:
    """The tile configuration and live flat rank of one layer shape in this step."""
    config, _ = choose_tile_config(x, weights, segments, slice_ranks)
    return config, _live(weights, segments, slice_ranks)


def _live(weights: LoRASlotWeights, segments: LoRASegments,
          slice_ranks: tuple[int, ...] | None) -> int | None:
    """The shrink's live prefix of the flat rank axis (module docstring, "Effective rank"); with
    a correction, of the doubled axis: all of the own half, the merged slot's prefix of the
    second (0 when neither half has work)."""
    if slice_ranks is None:
        return None
    live = live_flat_rank(slice_ranks, weights.max_rank)
    if segments.correction is None or live == 0:
        return live
    merged = weights.active_slice_ranks((segments.correction_slot,))  # type: ignore[arg-type]
    flat = len(weights.slice_widths) * weights.max_rank
    return flat + (flat if merged is None else live_flat_rank(merged, weights.max_rank))


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """fp32 multiplies exactly (no tf32); the interpreter multiplies bf16 blocks in fp32."""
    upcast = dtype == torch.bfloat16 and kernels_interpreted()
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def launch_shrink(x: torch.Tensor, weights: LoRASlotWeights, segments: LoRASegments,
                  cfg: ShrinkConfig, live_rank: int | None = None, pdl: int = 0,
                  pdl_launch: bool = True) -> torch.Tensor:
    """``h[split, p, j·R+ρ]`` (fp32) for every token position ``p`` with an adapter, ``ρ`` below
    its slot's rank. ``h`` always has the storage layout ``[split_k, T, J·R]``; ``live_rank``
    (``live_flat_rank`` of the batch, None = ``J·R``) bounds the rank blocks launched (module
    docstring: only valid when every slot of the batch has ``j·R + ranks[s, j] ≤ live_rank``).
    ``pdl``: the kernel's ``PDL`` constexpr, launched as a programmatic dependent launch when
    > 0 and ``pdl_launch`` (``pdl_supported`` must hold; without the launch the kernel's wait is
    a no-op and it still lets a dependent expand launch early)."""
    num_tokens, in_features = x.shape
    max_rank = weights.max_rank
    flat_rank = len(weights.slice_widths) * max_rank
    width = flat_rank * (2 if segments.correction is not None else 1)
    live = width if live_rank is None else min(live_rank, width)
    split_k, even_k = shrink_split(in_features, cfg)
    k_split = cdiv(cdiv(in_features, split_k), cfg.block_k) * cfg.block_k
    if split_k * num_tokens * width > _INT32_MAX:
        raise ValoraError(
            f"triton LoRA: split-K buffer too large ({split_k}×{num_tokens}×{width})")
    h = torch.empty(split_k, num_tokens, width, dtype=torch.float32, device=x.device)
    num_rank_blocks = cdiv(live, cfg.block_n)
    grid = (segments.tile_bound(cfg.block_m) * split_k * num_rank_blocks,)
    if grid[0] == 0:
        return h
    correction = segments.correction
    launcher(lora_shrink_kernel)[grid](
        x, weights.lora_a, h, weights.ranks, segments.sorted_tokens,
        segments.tile_list(cfg.block_m), correction if correction is not None else segments.tiles,
        segments.tile_capacity, num_rank_blocks, split_k, k_split, num_tokens * width,
        len(weights.slice_widths), in_features, max_rank, flat_rank, x.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=even_k,
        **dot_flags(x.dtype), CORRECTION=correction is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_flags(pdl, pdl_launch))
    return h


def launch_expand(h: torch.Tensor, y: torch.Tensor, weights: LoRASlotWeights,
                  segments: LoRASegments, cfg: ExpandConfig, scale_multiplier: float,
                  pdl: int = 0) -> None:
    """``y[t, slice j] += mult · scale · h_sum[p, j] · B[slot, slice j]ᵀ``, ≤ 4 slices a launch.
    ``pdl``: as ``launch_shrink``'s (2: also prefetch the first ``B`` chunk before the wait).
    A ``persistent`` config runs ``lora_expand_persistent`` where it applies (rank-major ``B``,
    no correction, no PDL), else this kernel with the same tiles."""
    split_k, num_tokens, width = h.shape
    widths = weights.slice_widths
    correction = segments.correction
    if persistent_expand_serves(cfg, weights.b_rank_major, correction is not None, pdl):
        launch_expand_persistent(h, y, weights, segments, cfg, scale_multiplier,
                                 dot_flags(y.dtype))
        return
    flat_rank = len(widths) * weights.max_rank
    bound = segments.tile_bound(cfg.block_m)
    for first, num_col_blocks, starts, cols in slice_groups(widths, cfg.block_n):
        grid = (bound * num_col_blocks,)
        if grid[0] == 0:
            continue
        launcher(lora_expand_kernel)[grid](
            h, weights.lora_b, y, weights.ranks, weights.scales, segments.sorted_tokens,
            segments.tile_list(cfg.block_m),
            correction if correction is not None else segments.tiles,
            segments.tile_capacity, num_col_blocks, split_k, num_tokens * width,
            *starts, *cols, first,
            len(widths), weights.max_rank, flat_rank, sum(widths), y.stride(0),
            float(scale_multiplier),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=expand_split_constexpr(split_k, cfg),
            **dot_flags(y.dtype), CORRECTION=correction is not None,
            **expand_b_layout(weights, cfg.block_k), EARLY_Y=cfg.early_y,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_flags(pdl))
