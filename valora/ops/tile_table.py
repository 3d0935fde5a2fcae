"""Profiled tile tables: one JSON file per GPU model in ``valora/ops/tables/``.

File layout (written by ``valora.ops.tuning``)::

    {"device": "NVIDIA H200", "version": 1,
     "entries": {"<ShapeBucket.key>": {"shrink": {...}, "expand": {...}, "time_us": {...},
                                        "b_layout": "rank"}}}

``b_layout`` records the ``lora_b`` storage layout the entry was tuned with
(``valora.ops.lora.B_LAYOUTS``; entries without it were tuned on ``"column"``, the layout of
before session 13). Any entry is correct for either layout; it only says for which the tiles were
chosen.

``select_tile_config`` is the run-time entry: a dictionary lookup of the call's bucket in the
table of the tensor's GPU. A bucket the tuner did not reach takes the entry of its nearest tuned
neighbour along the token and adapter axes (same rank, layer shape and slices; distance in
powers of two, ties to the larger token count) — a configuration tuned for a neighbouring batch
size is far closer to right than the shape-blind heuristic, which served every decode batch of
8, 32 and 128 before. ``heuristic_config`` remains for no table, no neighbour, or a rank above
what the tables cover. Results are memoised per bucket; it never touches the GPU.

Mix entries (``"mix:" + ShapeBucket.key``, ``valora.ops.tuning --mix``): a call whose slots the
host does not know — a CUDA-graph replay, which serves every batch of its token bucket — cannot
be keyed by its adapters' ranks and count; the regular answer is then the worst case (storage
rank, one adapter per token), tuned for that batch alone. A mix entry is the tile pair that
minimises the summed time over a mix of batches the replay may carry (one adapter, a few, one per
token; ranks 8 up to the storage rank), so one-adapter replays stop paying for tiles sized for
32 adapters. Looked up by exact bucket only (no neighbour: a mix tuned for decode sizes says
nothing of a 2048-token piece); without one the worst-case answer stands.

Rank axis: a call is keyed by the rank its tiles should serve — the slot storage rank, or the
batch's *effective rank* (the largest rank its adapters use, ``tile_rank``) when the host knows
it. A key rank below the storage rank whose bucket has no tuned entry (not even a neighbour)
takes the smallest tuned rank bucket above it, up to the storage rank's bucket: a configuration
tuned for a larger rank is valid for a smaller one and closer than the heuristic. Any
configuration is correct for any rank (the kernels take each slot's rank from the device); the
key only decides speed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from valora.logger import get_logger
from valora.ops.tile_config import (
    RANK_BUCKETS,
    ShapeBucket,
    TileConfig,
    heuristic_config,
    shape_bucket,
)

logger = get_logger(__name__)

TABLE_DIR = Path(__file__).with_name("tables")
TABLE_VERSION = 1
MIX_PREFIX = "mix:"
"""Key prefix of the entries tuned over a mix of batches (module docstring)."""


_KEY = re.compile(r"^t(\d+)-r(\d+)-i(\d+)-o(\d+)-a(\d+)-s(\d+)$")


def parse_bucket_key(key: str) -> ShapeBucket | None:
    """The inverse of ``ShapeBucket.key`` (None for a malformed key)."""
    match = _KEY.match(key)
    if match is None:
        return None
    t, r, i, o, a, s = (int(v) for v in match.groups())
    return ShapeBucket(t, r, i, o, a, s)


def _log2_gap(a: int, b: int) -> int:
    return abs(max(a, 1).bit_length() - max(b, 1).bit_length())


def table_file_name(device_name: str) -> str:
    """``"NVIDIA H200"`` → ``"NVIDIA_H200.json"`` (letters, digits and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


@dataclass
class TileTable:
    """Tuned entries for one GPU model; ``entries`` maps bucket keys to their JSON records."""

    device: str
    entries: dict[str, dict[str, object]] = field(default_factory=dict)

    _resolved: dict[str, tuple[TileConfig, str] | None] = field(default_factory=dict,
                                                                   repr=False, compare=False)

    def get(self, key: str) -> TileConfig | None:
        record = self.entries.get(key)
        if record is None:
            return None
        return TileConfig.from_json(record)  # type: ignore[arg-type]

    def lookup(self, bucket: ShapeBucket) -> tuple[TileConfig, str] | None:
        """``(config, "table")`` for a tuned bucket, ``(config, "nearest")`` for the nearest
        tuned neighbour (module docstring), None when there is none. Memoised."""
        if bucket.key in self._resolved:
            return self._resolved[bucket.key]
        found: tuple[TileConfig, str] | None = None
        exact = self.get(bucket.key)
        if exact is not None:
            found = (exact, "table")
        else:
            best: tuple[tuple[int, int], str] | None = None
            for key in self.entries:
                other = parse_bucket_key(key)
                if other is None or (other.max_rank, other.in_features, other.out_features,
                                     other.num_slices) != (bucket.max_rank, bucket.in_features,
                                                           bucket.out_features, bucket.num_slices):
                    continue
                distance = (_log2_gap(other.num_tokens, bucket.num_tokens)
                            + _log2_gap(other.num_adapters, bucket.num_adapters))
                rank = (distance, -other.num_tokens)
                if best is None or rank < best[0]:
                    best = (rank, key)
            if best is not None:
                config = self.get(best[1])
                assert config is not None
                found = (config, "nearest")
        self._resolved[bucket.key] = found
        return found

    def lookup_mix(self, bucket: ShapeBucket) -> TileConfig | None:
        """The mix entry of exactly ``bucket`` (module docstring), None when not tuned."""
        return self.get(MIX_PREFIX + bucket.key)

    def entry_layout(self, key: str) -> str | None:
        """The ``lora_b`` layout ``key``'s entry was tuned with (``"column"`` for an entry from
        before layouts were recorded: module docstring), None when there is no entry."""
        record = self.entries.get(key)
        if record is None:
            return None
        layout = record.get("b_layout", "column")
        return layout if isinstance(layout, str) else "column"

    def put(self, key: str, config: TileConfig, time_us: dict[str, float],
            b_layout: str | None = None) -> None:
        """Store ``key``'s winner and its times; ``b_layout``: the ``lora_b`` layout it was
        tuned with (module docstring)."""
        record: dict[str, object] = dict(config.to_json())
        record["time_us"] = {name: round(value, 3) for name, value in time_us.items()
                             if math.isfinite(value)}  # a candidate that could not run: left out
        if b_layout is not None:
            record["b_layout"] = b_layout
        self.put_record(key, record)

    def put_record(self, key: str, record: dict[str, object]) -> None:
        """Store ``record`` as it is (``put``'s, or another kind's under a prefixed key:
        ``skinny_tuning``)."""
        self.entries[key] = record
        self._resolved.clear()

    @classmethod
    def load(cls, path: Path, device: str = "") -> TileTable:
        """Read ``path``; an absent file is an empty table."""
        if not path.exists():
            return cls(device)
        data = json.loads(path.read_text())
        if data.get("version") != TABLE_VERSION:
            logger.warning("ignoring tile table %s: version %s != %s", path, data.get("version"),
                           TABLE_VERSION)
            return cls(device)
        return cls(str(data.get("device", device)), dict(data.get("entries", {})))

    def save(self, path: Path) -> None:
        """Merge into ``path`` (entries here win) and write atomically."""
        merged = TileTable.load(path, self.device)
        merged.entries.update(self.entries)
        self.entries = merged.entries
        self._resolved.clear()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        payload = {"device": self.device, "version": TABLE_VERSION,
                   "entries": dict(sorted(self.entries.items()))}
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)


@lru_cache(maxsize=8)
def table_for_device(device_name: str) -> TileTable:
    """The shipped table for a GPU model (empty when none ships); read once per process."""
    return TileTable.load(TABLE_DIR / table_file_name(device_name), device_name)


@lru_cache(maxsize=16)
def _device_facts(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda":
        return device.type, 132
    props = torch.cuda.get_device_properties(device)
    return props.name, int(props.multi_processor_count)


def tile_rank(effective_rank: int, storage_rank: int) -> int:
    """The rank a call's tile lookup is keyed by, given the largest rank its adapters use.

    ``effective_rank`` rounded up to its ``RANK_BUCKETS`` bucket (at least 1; unrounded above the
    last bucket), never above ``storage_rank`` — so the key lands in the same table bucket as the
    rounded rank, and an effective rank at or above the storage rank keys exactly as the storage
    rank always did. ``effective_rank`` 0 (nothing to compute) keys as 1.
    """
    rank = max(effective_rank, 1)
    if rank >= storage_rank:
        return storage_rank
    return min(_rank_bucket(rank) or rank, storage_rank)


def _key_ranks(max_rank: int, storage_rank: int | None) -> Iterator[int]:
    """``max_rank``, then (lazily: only walked on a miss) one rank in each larger rank bucket up
    to ``storage_rank``'s — the rank axis walk of the module docstring."""
    yield max_rank
    if storage_rank is None or storage_rank <= max_rank:
        return
    last = _rank_bucket(max_rank)
    for rank in (*(b for b in RANK_BUCKETS if max_rank < b < storage_rank), storage_rank):
        bucket = _rank_bucket(rank)
        if bucket != last:
            last = bucket
            yield rank


def _rank_bucket(rank: int) -> int | None:
    return next((b for b in RANK_BUCKETS if rank <= b), None)


def select_tile_config(device: torch.device, num_tokens: int, max_rank: int, in_features: int,
                       slice_widths: tuple[int, ...], num_adapters: int,
                       storage_rank: int | None = None,
                       mix: bool = False) -> tuple[TileConfig, str]:
    """The configuration for one call and where it came from (``"mix"``, ``"table"``,
    ``"nearest"`` or ``"heuristic"``).

    ``mix``: the host does not know the call's slots (``max_rank`` is then the storage rank and
    ``num_adapters`` the worst case): the bucket's mix entry when tuned (module docstring), else
    as without.

    ``max_rank`` is the key rank: the slot storage rank, or ``tile_rank`` of the batch's
    effective rank. With ``storage_rank`` above it, a key rank whose bucket has no tuned entry
    walks up the rank buckets to ``storage_rank``'s (module docstring; such a hit reports
    ``"nearest"``). The heuristic, the last resort, is given ``max_rank``. Tables serve CUDA
    devices only (``select_from_table`` with the device's table)."""
    name, num_sms = _device_facts(device)
    table = table_for_device(name) if device.type == "cuda" else None
    return select_from_table(table, num_sms, num_tokens, max_rank, in_features, slice_widths,
                             num_adapters, storage_rank, mix)


def select_from_table(table: TileTable | None, num_sms: int, num_tokens: int, max_rank: int,
                      in_features: int, slice_widths: tuple[int, ...], num_adapters: int,
                      storage_rank: int | None = None,
                      mix: bool = False) -> tuple[TileConfig, str]:
    """``select_tile_config`` against a given table (None: the heuristic only)."""
    if table is not None and mix:
        bucket = shape_bucket(num_tokens, max_rank, in_features, sum(slice_widths), num_adapters,
                              len(slice_widths))
        mixed = None if bucket is None else table.lookup_mix(bucket)
        if mixed is not None:
            return mixed, "mix"
    if table is not None:
        for step, rank in enumerate(_key_ranks(max_rank, storage_rank)):
            bucket = shape_bucket(num_tokens, rank, in_features, sum(slice_widths), num_adapters,
                                  len(slice_widths))
            if bucket is None:
                break
            found = table.lookup(bucket)
            if found is not None:
                return found if step == 0 else (found[0], "nearest")
    return heuristic_config(num_tokens, max_rank, in_features, max(slice_widths), num_adapters,
                            len(slice_widths), num_sms), "heuristic"
