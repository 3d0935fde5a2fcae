"""What the Triton LoRA launches are specialised on, derived from the tile config and the slot
storage (pure host code, shared by the launcher ``triton_lora``, the variant enumeration
``lora_variants`` and the benchmarks): the shrink's effective split-K, whether the expand
unrolls its split sum, its ``B`` masks and layout constexprs, and its launch groups of output
slices.
"""

from __future__ import annotations

import functools

from valora.ops.lora import LoRASlotWeights
from valora.ops.tile_config import ExpandConfig, ShrinkConfig

SLICES_PER_EXPAND = 4
"""Output slices one expand launch covers (the kernel's ``blocks_*`` / ``col_*`` arguments)."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def shrink_split(in_features: int, cfg: ShrinkConfig) -> tuple[int, bool]:
    """The split-K a shrink of ``in_features`` runs with ``cfg`` (at most one ``block_k`` per
    split) and whether the splits tile ``in_features`` exactly (the ``EVEN_K`` constexpr)."""
    split_k = max(1, min(cfg.split_k, cdiv(in_features, cfg.block_k)))
    return split_k, in_features % (cfg.block_k * split_k) == 0


def expand_split_constexpr(split_k: int, cfg: ExpandConfig) -> int:
    """The expand's ``SPLIT_K`` constexpr: the plane count when it unrolls their sum, else 0
    (a run-time loop)."""
    return split_k if unrolled_split_fits(split_k, cfg) else 0


B_MASK_ALIGN = 8
"""Rank granularity of the expand's ``B`` mask in a rank-tail chunk (8 bf16 = 16 bytes)."""


def expand_b_mask(max_rank: int, block_k: int) -> dict[str, object]:
    """The expand's ``MASK_B_K`` / ``B_ALIGN`` constexprs (``lora_kernels._expand_chunk``).

    Chunks of ≤ 16 ranks over a storage rank they divide read ``B``'s tail chunk whole (as many
    bytes as the masked read: one 32-byte sector a row); wider chunks mask it at the rank rounded
    up to ``B_MASK_ALIGN`` when the storage rank is a multiple of it (16-byte loads, at most 7
    padding columns), else at the exact rank."""
    mask = max_rank % block_k != 0 or block_k > 16
    align = B_MASK_ALIGN if mask and max_rank % B_MASK_ALIGN == 0 else 1
    return {"MASK_B_K": mask, "B_ALIGN": align}


def expand_b_layout(weights: LoRASlotWeights, block_k: int) -> dict[str, object]:
    """The expand's ``B`` constexprs for ``weights``' storage: ``expand_b_mask`` for the contiguous
    layout (none added: the binaries of before); rank-major ``B`` (``B_RANK_MAJOR``) masks its
    rank tail exactly, since its loads run along the columns."""
    if weights.b_rank_major:
        return {"B_RANK_MAJOR": True, "MASK_B_K": True, "B_ALIGN": 1}
    return expand_b_mask(weights.max_rank, block_k)


def persistent_expand_serves(cfg: ExpandConfig, b_rank_major: bool, correction: bool,
                             pdl: int = 0) -> bool:
    """Whether an expand launched with ``cfg`` runs the persistent kernel
    (``ExpandConfig.persistent``): it serves rank-major ``B`` without the mixed-mode correction
    and without programmatic dependent launch; other calls take the one-item kernel."""
    return cfg.persistent > 0 and b_rank_major and not correction and pdl == 0


def persistent_split_constexpr(split_k: int, cfg: ExpandConfig) -> int:
    """The persistent expand's ``SPLIT_K`` constexpr (``lora_expand_persistent``): one plane
    unrolled too — a run-time loop inside its item loop would stop the pipeliner from staging
    the items — else as ``expand_split_constexpr``."""
    return 1 if split_k == 1 else expand_split_constexpr(split_k, cfg)


UNROLLED_SPLIT_BYTES = 144 << 10
"""Shared memory the expand may spend on staged split-K planes when it unrolls their sum (of the
~227 KB an H100 / H200 block may use; B tiles and the pipeline need the rest)."""


def unrolled_split_fits(split_k: int, cfg: ExpandConfig) -> bool:
    """Whether the expand unrolls its split-K sum for this config (``lora_kernels._expand_chunk``):
    one plane needs no sum; otherwise the staged planes must fit ``UNROLLED_SPLIT_BYTES``."""
    staged = split_k * cfg.block_m * cfg.block_k * 4 * max(1, cfg.num_stages)
    return split_k > 1 and staged <= UNROLLED_SPLIT_BYTES


def slice_groups(widths: tuple[int, ...] | list[int], span: int
                 ) -> tuple[tuple[int, int, list[int], list[int]], ...]:
    """Launch groups of up to ``SLICES_PER_EXPAND`` output slices: ``(first slice, number of
    column blocks of width ``span`` over the group, the block index where each later slice
    starts (padded), the slices' column offsets in ``y`` (padded))``. Memoised per shape: the
    lists are shared, never mutate them."""
    return _slice_groups(tuple(widths), span)


@functools.lru_cache(maxsize=1024)
def _slice_groups(widths: tuple[int, ...], span: int
                  ) -> tuple[tuple[int, int, list[int], list[int]], ...]:
    offsets = [sum(widths[:j]) for j in range(len(widths) + 1)]
    groups = []
    for first in range(0, len(widths), SLICES_PER_EXPAND):
        group = widths[first:first + SLICES_PER_EXPAND]
        ends = [sum(cdiv(w, span) for w in group[:g + 1]) for g in range(len(group))]
        num_blocks = ends[-1]
        starts = (ends[:-1] + [num_blocks] * SLICES_PER_EXPAND)[:SLICES_PER_EXPAND - 1]
        cols = list(offsets[first:first + len(group) + 1])
        cols = cols + [cols[-1]] * (SLICES_PER_EXPAND + 1 - len(cols))
        groups.append((first, num_blocks, starts, cols))
    return tuple(groups)
