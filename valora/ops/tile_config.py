"""Tile configurations for the Triton LoRA kernels, and the shape buckets they are tuned for.

A launch of the shrink kernel (``h = x · Aᵀ``) and of the expand kernel (``y += s·h · Bᵀ``) is
shaped by a ``TileConfig``. The configuration for a call is chosen by an O(1) lookup of its
``ShapeBucket`` in a table profiled on the current GPU (``valora.ops.tile_table``), with
``heuristic_config`` as the fallback on a miss.

Invariants: every block size is a power of two ≥ 16 (``tl.dot`` needs 16); ``block_m`` is one of
``BLOCK_M_CHOICES`` (the prepare step builds a tile list for each of them); ``split_k`` ≥ 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BLOCK_M_CHOICES: tuple[int, ...] = (16, 32, 64, 128)
TOKEN_BUCKETS: tuple[int, ...] = tuple(1 << i for i in range(16))  # 1 .. 32768
RANK_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)
ADAPTER_BUCKETS: tuple[int, ...] = (1, 8, 32, 128, 512)
MAX_TABLE_RANK = RANK_BUCKETS[-1]


def next_power_of_2(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def _ceil_bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    for bucket in buckets:
        if value <= bucket:
            return bucket
    return None


@dataclass(frozen=True)
class ShrinkConfig:
    """Tiles of ``h[rows, n] = Σ_k x[rows, k] · A[slot, n, k]`` (``n``: every slice's ranks)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandConfig:
    """Tiles of ``y[rows, cols] += s · Σ_r h[rows, r] · B[slot, cols, r]`` (``block_k``: rank).

    ``early_y``: load the ``y`` tile before the rank loop (``lora_kernels.lora_expand_kernel``'s
    ``EARLY_Y``). ``persistent`` > 0: launch ``persistent`` programs an SM that loop over the
    (tile, column block) items, software-pipelined over ``num_stages``
    (``lora_expand_persistent``), instead of one program an item; it serves rank-major ``B``
    without the mixed-mode correction, other calls take the one-item kernel with the same tiles
    (``early_y`` does not apply to it). Both are left out of the table's JSON when unset, so
    older tables read unchanged."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    early_y: bool = False
    persistent: int = 0


@dataclass(frozen=True)
class TileConfig:
    """How one call is launched: the shrink and the expand kernel's tiles."""

    shrink: ShrinkConfig
    expand: ExpandConfig

    def to_json(self) -> dict[str, dict[str, int]]:
        expand = {key: int(value) for key, value in asdict(self.expand).items()
                  if key not in ("early_y", "persistent") or value}
        return {"shrink": asdict(self.shrink), "expand": expand}

    @classmethod
    def from_json(cls, data: dict[str, dict[str, int]]) -> TileConfig:
        expand = dict(data["expand"])
        early_y = bool(expand.pop("early_y", False))
        persistent = int(expand.pop("persistent", 0))
        return cls(ShrinkConfig(**data["shrink"]),
                   ExpandConfig(**expand, early_y=early_y, persistent=persistent))


@dataclass(frozen=True)
class ShapeBucket:
    """A class of LoRA calls that share one tile configuration.

    ``num_tokens``, ``max_rank`` (the slot storage rank), ``num_adapters`` (distinct slots in the
    batch), ``in_features`` and ``out_features`` (sum of slice widths) are rounded up to their
    bucket; ``num_slices`` is exact. ``key`` is the table key.
    """

    num_tokens: int
    max_rank: int
    in_features: int
    out_features: int
    num_adapters: int
    num_slices: int

    @property
    def key(self) -> str:
        return (f"t{self.num_tokens}-r{self.max_rank}-i{self.in_features}-o{self.out_features}"
                f"-a{self.num_adapters}-s{self.num_slices}")


def shape_bucket(num_tokens: int, max_rank: int, in_features: int, out_features: int,
                 num_adapters: int, num_slices: int) -> ShapeBucket | None:
    """The bucket of a call, or None when the table cannot cover it (rank above ``MAX_TABLE_RANK``).

    ``num_adapters`` < 1 means unknown and takes the worst case, one adapter per token (a CUDA
    graph captures one configuration for whatever adapters its replays bring: the graphs of the
    decode path once took the single-adapter entry this way and ran 32 distinct adapters through
    a configuration tuned for one: 2.26× the memory floor at batch 32 on an H200, against 1.64×
    with the worst-case heuristic the day before).
    """
    if num_adapters < 1:
        num_adapters = num_tokens
    rank = _ceil_bucket(max_rank, RANK_BUCKETS)
    if rank is None:
        return None
    tokens = _ceil_bucket(max(num_tokens, 1), TOKEN_BUCKETS) or TOKEN_BUCKETS[-1]
    adapters = _ceil_bucket(max(min(num_adapters, num_tokens), 1), ADAPTER_BUCKETS)
    return ShapeBucket(tokens, rank, next_power_of_2(in_features), next_power_of_2(out_features),
                       adapters or ADAPTER_BUCKETS[-1], num_slices)


def _block_m_for(tokens_per_adapter: int, big: bool) -> int:
    if tokens_per_adapter <= 16:
        return 16
    if tokens_per_adapter <= 32:
        return 32
    return 128 if big and tokens_per_adapter >= 512 else 64


def heuristic_config(num_tokens: int, max_rank: int, in_features: int, max_slice_width: int,
                     num_adapters: int, num_slices: int, num_sms: int = 132) -> TileConfig:
    """A reasonable configuration for any shape (used when the table has no entry).

    Few tokens per adapter: the op streams adapter weights, so split K until the grid holds a few
    programs per multiprocessor. Many tokens per adapter: the op streams activations; no split.
    Block sizes never exceed the padded problem (keeps small test shapes cheap).
    """
    adapters = max(1, min(num_adapters if num_adapters > 0 else num_tokens, num_tokens))
    per_adapter = max(1, num_tokens // adapters)
    block_m = _block_m_for(per_adapter, num_tokens >= 4096)
    flat_rank = next_power_of_2(max(16, num_slices * max_rank))
    small_m = per_adapter <= 32
    block_n = min(flat_rank, 16 if max_rank <= 16 else (32 if small_m or max_rank <= 32 else 64))
    block_k = min(max(16, next_power_of_2(in_features)), 256 if small_m else 64)
    tiles = adapters * -(-per_adapter // block_m)
    rank_blocks = max(1, -(-num_slices * max_rank // block_n) // 2)
    split_k = 1
    while (tiles * rank_blocks * split_k * 2 <= 2 * num_sms
           and in_features // (block_k * split_k * 2) >= 1 and split_k < 64):
        split_k *= 2
    shrink = ShrinkConfig(block_m, block_n, block_k, split_k, 4, 3 if small_m else 4)
    exp_m = block_m
    exp_n = min(max(16, next_power_of_2(max_slice_width)), 128)
    exp_k = min(max(16, next_power_of_2(max_rank)), 16 if small_m else 32)
    if exp_m == 128 and max_rank > 32 and max_slice_width >= 256:
        # Long segments of large ranks (H200, T = 16384, rank 64: the best of 18 expand variants
        # in 11 of 12 points, 1.04-1.46x faster than 64x128x32; at rank 16 it lost).
        return TileConfig(shrink, ExpandConfig(128, 256, 32, 8, 2))
    # One pipeline stage when segments are short: a decode program's rank loop runs once or twice
    # (H200 decode sweep, bench/results/ops/decode-tiles-h200-2114aa0/: 16×128×16 with 1 stage
    # was within 5 % of the best of 21 expand tiles at 8 of 12 points, with 2 stages at 3).
    expand = ExpandConfig(exp_m, exp_n, exp_k, 4, 1 if small_m else 3)
    return TileConfig(shrink, expand)
