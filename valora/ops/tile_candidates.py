"""The tile configurations the tuner tries for a shape bucket.

Block shapes, warps and stages are compile-time constants of the kernels, so the tuner draws them
from short fixed lists (each entry compiles once per dtype and K-divisibility, then serves every
bucket). Split-K is a run-time argument of the shrink kernel: it is chosen freely per bucket.
``shrink_candidates`` and ``expand_candidates`` filter the lists to what suits a bucket's shape;
the heuristic configuration is always among them, so a tuned entry is never worse than the
fallback on the tuner's own measurement.
"""

from __future__ import annotations

from valora.ops.tile_config import (
    ExpandConfig,
    ShrinkConfig,
    heuristic_config,
    next_power_of_2,
)

# (block_m, block_n, block_k, num_warps, num_stages)
SHRINK_TILES: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (32, 32, 128, 4, 3),
    (32, 64, 128, 4, 3), (64, 32, 128, 4, 3), (64, 64, 64, 4, 4), (64, 64, 128, 8, 3),
    (128, 64, 64, 8, 3), (128, 32, 64, 4, 4),
)
EXPAND_TILES: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 64, 16, 4, 2), (16, 128, 16, 4, 2), (16, 128, 32, 4, 2), (16, 256, 16, 4, 2),
    (16, 64, 64, 4, 2), (16, 128, 64, 4, 2), (16, 256, 32, 8, 2),
    (32, 128, 32, 4, 2), (64, 64, 32, 4, 2), (64, 128, 16, 4, 3), (64, 128, 32, 4, 3),
    (64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (128, 256, 32, 8, 2),
)
DECODE_SHRINK_TILES: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 16, 128, 2, 2), (16, 32, 128, 4, 2), (16, 16, 256, 2, 2), (16, 32, 256, 2, 2),
    (16, 64, 64, 4, 2),
)
DECODE_EXPAND_TILES: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 64, 16, 2, 1), (16, 128, 16, 2, 1), (16, 128, 16, 4, 1), (16, 256, 16, 4, 1),
    (16, 256, 16, 8, 1), (16, 512, 16, 4, 1), (16, 128, 32, 4, 1), (16, 256, 32, 4, 1),
    (16, 512, 32, 8, 1), (16, 64, 16, 2, 2), (16, 128, 16, 2, 2),
)
DECODE_MAX_TOKENS = 256
"""Buckets up to this many tokens also try the ``DECODE_*`` tiles: 2-warp programs, 1- and
2-stage pipelines (a decode program's rank loop runs once or twice: deeper staging only costs
shared memory, so fewer programs fit an SM). On an H200 at LLaVA-1.5-7B decode shapes (32
tokens; one adapter, 8, or 32 of ranks 8–64) they were the best of 73 shrink and 21 expand
variants at 8 of 12 shrink and all 12 expand points: 0–19 % (shrink) and 1–16 % (expand) below
the best of the tuner's earlier lists (``bench/results/ops/decode-tiles-h200-2114aa0/``)."""
EARLY_Y_MIN_TOKENS = 4096
"""Buckets from this many tokens also try every tile of ``block_m`` ≥ 64 with the ``y`` load
before the rank loop (``ExpandConfig.early_y``). On an H200 the early load beat the same tile
late in 154 of 255 such pairs at T ≥ 4096 (late / early time 0.57–2.05), but was the best of
all 18 variants timed at only 2 of 32 points there, by 4–5 %
(``bench/results/ops/expand-variants-h200-ef1051a/``); the re-tune chose it for 1 of 96
buckets. A choice per bucket, cheap to offer where a bucket's timings are long anyway."""
PERSISTENT_MIN_TOKENS = 8192
"""Buckets from this many tokens also try ``PERSISTENT_TILES`` (``ExpandConfig.persistent``). On
an H200 at 16384 tokens with rank 64 the persistent expand was 1.04–1.40× faster than the
one-item kernel with the table's tiles at all eight layer points; at rank 16 and at 4096 tokens
slower (``bench/results/ops/persistent-expand-large-h200-b33a1a9/``): a choice per bucket."""
PERSISTENT_TILES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (128, 256, 32, 8, 2, 1), (128, 256, 32, 8, 3, 1), (64, 128, 64, 4, 3, 2),
    (64, 128, 32, 4, 3, 2),
)
"""``(block_m, block_n, block_k, num_warps, num_stages, programs an SM)``: the best variants of
that measurement (the first at every 16384-token rank-64 point)."""
SPLITS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def _block_m_limit(num_tokens: int, num_adapters: int) -> int:
    per_adapter = max(1, num_tokens // max(1, min(num_adapters, num_tokens)))
    return max(16, 2 * next_power_of_2(per_adapter))


def shrink_candidates(num_tokens: int, max_rank: int, in_features: int, num_adapters: int,
                      num_slices: int, num_sms: int,
                      max_splits_per_tile: int = 4) -> list[ShrinkConfig]:
    """Shrink configurations worth timing for this shape (heuristic first, no duplicates)."""
    adapters = max(1, min(num_adapters, num_tokens))
    flat = next_power_of_2(max(16, num_slices * max_rank))
    k_cap = max(16, next_power_of_2(in_features))
    m_cap = _block_m_limit(num_tokens, adapters)
    found = [heuristic_config(num_tokens, max_rank, in_features, 16, adapters, num_slices,
                              num_sms).shrink]
    decode = DECODE_SHRINK_TILES if num_tokens <= DECODE_MAX_TOKENS else ()
    for block_m, block_n, block_k, warps, stages in SHRINK_TILES + decode:
        if block_m > m_cap or block_n > flat or block_k > k_cap:
            continue
        tiles = adapters * -(-max(1, num_tokens // adapters) // block_m)
        rank_blocks = max(1, -(-num_slices * max_rank // block_n))
        programs = {split: tiles * rank_blocks * split for split in SPLITS
                    if split == 1 or in_features // (block_k * split) >= 1}
        target = 3 * num_sms
        ranked = sorted(programs, key=lambda s: abs(programs[s] - target))
        for split in ranked[:max_splits_per_tile]:
            config = ShrinkConfig(block_m, block_n, block_k, split, warps, stages)
            if config not in found:
                found.append(config)
    return found


def expand_candidates(num_tokens: int, max_rank: int, max_slice_width: int, num_adapters: int,
                      in_features: int, num_slices: int, num_sms: int) -> list[ExpandConfig]:
    """Expand configurations worth timing for this shape (heuristic first, no duplicates)."""
    adapters = max(1, min(num_adapters, num_tokens))
    n_cap = max(16, next_power_of_2(max_slice_width))
    k_cap = max(16, next_power_of_2(max_rank))
    m_cap = _block_m_limit(num_tokens, adapters)
    found = [heuristic_config(num_tokens, max_rank, in_features, max_slice_width, adapters,
                              num_slices, num_sms).expand]
    decode = DECODE_EXPAND_TILES if num_tokens <= DECODE_MAX_TOKENS else ()
    for block_m, block_n, block_k, warps, stages in EXPAND_TILES + decode:
        if block_m > m_cap or block_n > n_cap or block_k > k_cap:
            continue
        for early_y in (False, True) if num_tokens >= EARLY_Y_MIN_TOKENS and block_m >= 64 \
                else (False,):
            config = ExpandConfig(block_m, block_n, block_k, warps, stages, early_y)
            if config not in found:
                found.append(config)
    persistent = PERSISTENT_TILES if num_tokens >= PERSISTENT_MIN_TOKENS else ()
    for block_m, block_n, block_k, warps, stages, per_sm in persistent:
        if block_m <= m_cap and block_n <= n_cap and block_k <= k_cap:
            found.append(ExpandConfig(block_m, block_n, block_k, warps, stages,
                                      persistent=per_sm))
    return found
