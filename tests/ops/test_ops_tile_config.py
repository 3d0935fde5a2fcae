"""Shape buckets, the heuristic fallback, the tile table and the resumable tuner (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_cases import assert_valid_tile_config

from valora.ops import tuning
from valora.ops.tile_candidates import expand_candidates, shrink_candidates
from valora.ops.tile_config import (
    ExpandConfig,
    ShrinkConfig,
    TileConfig,
    heuristic_config,
    shape_bucket,
)
from valora.ops.tile_table import (
    TileTable,
    parse_bucket_key,
    select_tile_config,
    table_file_name,
)
from valora.ops.timing import rotations_for


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 16384, 70000])
@pytest.mark.parametrize(("rank", "in_features", "width", "slices"),
                         [(1, 16, 8, 1), (16, 4096, 4096, 3), (128, 11008, 4096, 1),
                          (300, 4096, 11008, 2)])
@pytest.mark.parametrize("adapters", [-1, 1, 32, 600])
def test_heuristic_is_always_valid(tokens: int, rank: int, in_features: int, width: int,
                                   slices: int, adapters: int) -> None:
    assert_valid_tile_config(heuristic_config(tokens, rank, in_features, width, adapters, slices))


def test_bucket_rounding_and_coverage() -> None:
    bucket = shape_bucket(100, 24, 4096, 3 * 4096, 5, 3)
    assert bucket is not None
    assert bucket.key == "t128-r32-i4096-o16384-a8-s3"
    assert shape_bucket(100, 257, 4096, 4096, 5, 1) is None  # rank above the tables
    big = shape_bucket(10**6, 16, 11008, 4096, 10**4, 1)
    assert big is not None
    assert (big.num_tokens, big.in_features, big.num_adapters) == (32768, 16384, 512)


def test_candidates_start_with_the_heuristic_and_are_valid() -> None:
    shrinks = shrink_candidates(64, 16, 4096, 32, 1, 132)
    expands = expand_candidates(64, 16, 4096, 32, 4096, 1, 132)
    heuristic = heuristic_config(64, 16, 4096, 4096, 32, 1, 132)
    assert shrinks[0] == heuristic.shrink and expands[0] == heuristic.expand
    assert len(set(shrinks)) == len(shrinks) > 1 and len(set(expands)) == len(expands) > 1
    for s in shrinks:
        for e in expands:
            assert_valid_tile_config(TileConfig(s, e))


def test_table_round_trip_and_merge(tmp_path: Path) -> None:
    path = tmp_path / table_file_name("NVIDIA H200")
    assert path.name == "NVIDIA_H200.json"
    one = TileConfig(ShrinkConfig(16, 16, 256, 8, 4, 3), ExpandConfig(16, 128, 16, 4, 2))
    two = TileConfig(ShrinkConfig(64, 64, 64, 1, 4, 4), ExpandConfig(64, 128, 32, 4, 3))
    first = TileTable("NVIDIA H200")
    first.put("a", one, {"shrink": 1.0})
    first.save(path)
    second = TileTable("NVIDIA H200")
    second.put("b", two, {"shrink": 2.0})
    second.save(path)  # merges with "a" on disk
    loaded = TileTable.load(path)
    assert loaded.get("a") == one and loaded.get("b") == two and loaded.get("c") is None
    assert json.loads(path.read_text())["device"] == "NVIDIA H200"


def test_cpu_lookup_uses_the_heuristic() -> None:
    config, source = select_tile_config(torch.device("cpu"), 64, 16, 4096, (4096,), 32)
    assert source == "heuristic"
    assert config == heuristic_config(64, 16, 4096, 4096, 32, 1, 132)


def test_tuner_writes_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner end to end on tiny buckets (wall-clock timing in the interpreter; CUDA graphs
    on a GPU, where CPU tensors cannot reach compiled kernels), then resumed. Each entry records
    the ``lora_b`` layout it was tuned with."""
    monkeypatch.setenv("VALORA_LORA_B_LAYOUT", "column")
    out = tmp_path / "table.json"
    argv = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--layers", "24:16,8", "--tokens", "4,16", "--ranks", "8",
            "--adapters", "2", "--max-candidates", "2", "--repeats", "1", "--out", str(out),
            "--dtype", "fp32"]
    assert tuning.main(argv) == 0
    table = TileTable.load(out)
    assert set(table.entries) == {"t4-r16-i32-o32-a8-s2", "t16-r16-i32-o32-a8-s2"}
    for key in table.entries:
        config = table.get(key)
        assert config is not None
        assert_valid_tile_config(config)
    assert {json.loads(out.read_text())["entries"][key]["b_layout"] for key in table.entries} == {
        "column"}
    stamp = out.stat().st_mtime_ns
    assert tuning.main(argv) == 0  # resume: every bucket present, nothing re-tuned or rewritten
    assert out.stat().st_mtime_ns == stamp
    data = json.loads(out.read_text())
    entries = data["entries"]
    entries["t16-r16-i32-o32-a8-s2"].pop("b_layout")  # an entry from before layouts were kept
    out.write_text(json.dumps(data))
    monkeypatch.setenv("VALORA_LORA_B_LAYOUT", "rank")
    assert tuning.main([*argv, "--tokens", "16"]) == 0  # the last --tokens counts
    after = json.loads(out.read_text())["entries"]
    assert after["t16-r16-i32-o32-a8-s2"]["b_layout"] == "rank"  # tuned again, on the new layout
    assert after["t4-r16-i32-o32-a8-s2"] == entries["t4-r16-i32-o32-a8-s2"]  # not selected
    assert TileTable.load(out).entry_layout("t4-r16-i32-o32-a8-s2") == "column"
    assert TileTable.load(out).entry_layout("t1-r16-i32-o32-a8-s2") is None


def test_a_candidate_the_gpu_cannot_run_is_skipped(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A tile whose compile needs more shared memory than the GPU has (Triton's
    ``OutOfResources``) costs the tuner that candidate, not the run; its time is left out of
    the entry. When no candidate of a kernel runs, the bucket fails with a clear error."""
    from triton.runtime.errors import OutOfResources

    real = tuning.launch_expand
    refused: list[ExpandConfig] = []

    def launch_expand(h: torch.Tensor, y: torch.Tensor, weights: object, segments: object,
                      cfg: ExpandConfig, mult: float, pdl: int = 0) -> None:
        if cfg.num_stages == 1:  # the heuristic at this shape; the other candidate runs
            refused.append(cfg)
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real(h, y, weights, segments, cfg, mult, pdl)

    monkeypatch.setattr(tuning, "launch_expand", launch_expand)
    out = tmp_path / "table.json"
    argv = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--layers", "24:64,32",
            "--tokens", "16", "--ranks", "8", "--adapters", "2", "--max-candidates", "2",
            "--repeats", "1", "--out", str(out), "--dtype", "fp32"]
    assert tuning.main(argv) == 0
    assert refused
    (entry,) = json.loads(out.read_text())["entries"].values()
    assert entry["expand"]["num_stages"] == 2 and "expand_heuristic" not in entry["time_us"]

    def never(*args: object, **kwargs: object) -> None:
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(tuning, "launch_expand", never)
    with pytest.raises(RuntimeError, match="no tile candidate"):
        tuning.main([*argv, "--no-resume"])


def _config(split: int) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, 256, split, 4, 3), ExpandConfig(16, 128, 16, 4, 2))


def test_bucket_keys_parse_back() -> None:
    bucket = shape_bucket(32, 64, 4096, 12288, 32, 3)
    assert bucket is not None and parse_bucket_key(bucket.key) == bucket
    assert parse_bucket_key("t1-r16") is None


def test_missing_bucket_takes_its_nearest_tuned_neighbour() -> None:
    table = TileTable("NVIDIA H200")
    table.put("t16-r64-i4096-o16384-a32-s3", _config(2), {})
    table.put("t64-r64-i4096-o16384-a32-s3", _config(4), {})
    table.put("t32-r16-i4096-o16384-a32-s3", _config(8), {})  # other rank: never a neighbour
    table.put("t32-r64-i4096-o4096-a32-s1", _config(16), {})  # other layer: never a neighbour
    exact = shape_bucket(16, 64, 4096, 12288, 32, 3)
    between = shape_bucket(32, 64, 4096, 12288, 32, 3)
    far = shape_bucket(1024, 64, 4096, 12288, 32, 3)
    alone = shape_bucket(32, 128, 4096, 12288, 32, 3)
    assert exact and between and far and alone
    assert table.lookup(exact) == (_config(2), "table")
    assert table.lookup(between) == (_config(4), "nearest")  # tie: the larger token count
    assert table.lookup(far) == (_config(4), "nearest")
    assert table.lookup(alone) is None
    table.put(between.key, _config(32), {})  # a new entry invalidates the memo
    assert table.lookup(between) == (_config(32), "table")


def test_rotations_cover_the_target_and_respect_memory() -> None:
    assert rotations_for(300 << 20) == 1
    assert rotations_for(64 << 20) == 4
    assert rotations_for(1) == 32
    assert rotations_for(1 << 20, set_bytes=1 << 30, memory_bytes=3 << 30) == 3
    assert rotations_for(1 << 20, set_bytes=8 << 30) == 1


def test_unknown_adapter_count_takes_the_worst_case_bucket() -> None:
    """Graph-captured segments do not know their adapters: one adapter per token, not one."""
    unknown = shape_bucket(32, 64, 4096, 12288, -1, 3)
    assert unknown is not None and unknown == shape_bucket(32, 64, 4096, 12288, 32, 3)
    assert unknown.num_adapters == 32

