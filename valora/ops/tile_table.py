"""Profiled tile tables: one JSON file per GPU model in ``valora/ops/tables/``.

File layout (written by ``valora.ops.tuning``)::

    {"device": "NVIDIA H200", "version": 1,
     "entries": {"<ShapeBucket.key>": {"shrink": {...}, "expand": {...}, "time_us": {...}}}}

``select_tile_config`` is the run-time entry: a dictionary lookup of the call's bucket in the
table of the tensor's GPU. A bucket the tuner did not reach takes the entry of its nearest tuned
neighbour along the token and adapter axes (same rank, layer shape and slices; distance in
powers of two, ties to the larger token count) — a configuration tuned for a neighbouring batch
size is far closer to right than the shape-blind heuristic, which served every decode batch of
8, 32 and 128 before. ``heuristic_config`` remains for no table, no neighbour, or a rank above
what the tables cover. Results are memoised per bucket; it never touches the GPU.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from valora.logger import get_logger
from valora.ops.tile_config import ShapeBucket, TileConfig, heuristic_config, shape_bucket

logger = get_logger(__name__)

TABLE_DIR = Path(__file__).with_name("tables")
TABLE_VERSION = 1


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

    def put(self, key: str, config: TileConfig, time_us: dict[str, float]) -> None:
        record: dict[str, object] = dict(config.to_json())
        record["time_us"] = {name: round(value, 3) for name, value in time_us.items()}
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


def select_tile_config(device: torch.device, num_tokens: int, max_rank: int, in_features: int,
                       slice_widths: tuple[int, ...], num_adapters: int) -> tuple[TileConfig, str]:
    """The configuration for one call and where it came from (``"table"``, ``"nearest"`` or
    ``"heuristic"``)."""
    name, num_sms = _device_facts(device)
    bucket = shape_bucket(num_tokens, max_rank, in_features, sum(slice_widths), num_adapters,
                          len(slice_widths))
    if bucket is not None and device.type == "cuda":
        found = table_for_device(name).lookup(bucket)
        if found is not None:
            return found
    return heuristic_config(num_tokens, max_rank, in_features, max(slice_widths), num_adapters,
                            len(slice_widths), num_sms), "heuristic"
