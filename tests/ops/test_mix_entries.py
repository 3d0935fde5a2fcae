"""Mix entries (``valora.ops.tile_table``, "Mix entries"): the tiles of calls whose slots the
host does not know (CUDA-graph replays) — tuned over a mix of batches, looked up by exact bucket,
asked for by the launcher only when the slots are unknown (CPU). Their enumeration and warm-up
are tested in ``test_warmup.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_cases import assert_valid_tile_config

import valora.ops.triton_lora as triton_lora
from valora.ops import tuning
from valora.ops.lora import prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_segments import LoRASegments, unhinted_lora_batch
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig
from valora.ops.tile_table import (
    MIX_PREFIX,
    TileTable,
    parse_bucket_key,
    select_from_table,
    select_tile_config,
)

CPU = torch.device("cpu")


def _config(split: int) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, 256, split, 4, 3), ExpandConfig(16, 128, 16, 4, 2))


def test_tuner_writes_mix_entries(tmp_path: Path) -> None:
    """``--mix``: entries under ``mix:`` + the bucket key, tuned over the three kinds of batch,
    beside (never instead of) the regular ones; resumed like them."""
    out = tmp_path / "table.json"
    argv = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--layers", "24:16,8",
            "--tokens", "8", "--ranks", "16", "--adapters", "4", "--max-candidates", "2",
            "--repeats", "1", "--out", str(out), "--dtype", "fp32", "--mix"]
    assert tuning.main(argv) == 0
    table = TileTable.load(out)
    assert set(table.entries) == {"mix:t8-r16-i32-o32-a8-s2"}
    config = table.get("mix:t8-r16-i32-o32-a8-s2")
    assert config is not None
    assert_valid_tile_config(config)
    record = table.entries["mix:t8-r16-i32-o32-a8-s2"]
    assert isinstance(record["time_us"], dict) and record["time_us"]["shrink"] > 0
    stamp = out.stat().st_mtime_ns
    assert tuning.main(argv) == 0
    assert out.stat().st_mtime_ns == stamp


def test_mix_problems_cover_one_few_and_all_adapters() -> None:
    shape = tuning.TuneShape(32, 64, 64, (16,), 32)
    ranks = tuning.mix_slot_ranks(64, 32)
    assert ranks[:5] == [8, 16, 32, 64, 8] and max(ranks) == 64
    assert tuning.mix_slot_ranks(16, 1) == [8] and tuning.mix_slot_ranks(4, 3) == [4, 4, 4]
    generator = torch.Generator().manual_seed(0)
    one = tuning.token_slots_of("one", shape, ranks, generator)
    few = tuning.token_slots_of("few", shape, ranks, generator)
    every = tuning.token_slots_of("all", shape, ranks, generator)
    assert set(one.tolist()) == {1} and ranks[1] == 16
    assert 1 < len(set(few.tolist())) <= 8
    assert sorted(every.tolist()) == list(range(32))
    with pytest.raises(ValueError, match="kind"):
        tuning.token_slots_of("some", shape, ranks, generator)


def test_mix_entries_serve_unknown_slots_by_exact_bucket_only() -> None:
    table = TileTable("NVIDIA H200")
    table.put("t32-r64-i4096-o16384-a32-s3", _config(2), {})
    table.put(MIX_PREFIX + "t32-r64-i4096-o16384-a32-s3", _config(4), {})
    table.put(MIX_PREFIX + "t64-r64-i4096-o16384-a32-s3", _config(8), {})

    def select(tokens: int, mix: bool) -> tuple[TileConfig, str]:
        return select_from_table(table, 132, tokens, 64, 4096, (4096,) * 3, min(tokens, 32),
                                 storage_rank=64, mix=mix)

    assert select(32, mix=True) == (_config(4), "mix")
    assert select(24, mix=True) == (_config(4), "mix")  # same token bucket
    assert select(32, mix=False) == (_config(2), "table")  # slots known: never a mix entry
    # No mix entry for 16 tokens: the regular (nearest) answer, not the t32 / t64 mix entries.
    assert select(16, mix=True) == (_config(2), "nearest")
    # Mix keys never count as regular neighbours.
    assert parse_bucket_key(MIX_PREFIX + "t32-r64-i4096-o16384-a32-s3") is None
    assert select(128, mix=False) == (_config(2), "nearest")


def test_the_launcher_asks_for_a_mix_entry_only_when_slots_are_unknown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> tuple[TileConfig, str]:
        asked.append(bool(kwargs.get("mix")))
        return select_tile_config(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "select_tile_config", spy)
    weights = make_slot_weights([4, 2, 8], 32, (8, 8), torch.float32, CPU, seed=1)
    x = torch.zeros(6, 32)
    slots = torch.tensor([0, 1, 2, 0, 1, -1], dtype=torch.int32)
    known = prepare_lora_batch(slots, 3, "triton")  # CPU slots: the host derives them
    unknown = unhinted_lora_batch(slots, 3)  # as a captured graph's: unknown to the host
    for batch_segments in (known.backend_data, unknown.backend_data):
        assert isinstance(batch_segments, LoRASegments)
        triton_lora.choose_tile_config(x, weights, batch_segments,
                                       triton_lora.active_slice_ranks(weights, batch_segments))
    assert asked == [False, True]
