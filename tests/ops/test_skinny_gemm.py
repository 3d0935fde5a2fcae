"""The skinny GEMM of decode-size projections (``valora.ops.skinny_gemm``) against ``F.linear``.

In the CPU interpreter on small shapes (rows 1 … 32, widths off the tile grid, bias or none,
every tile kind the heuristic picks, fp32 and bf16), the dispatch rules, and its tuner
(``valora tune-kernels --skinny``) and table records; on a GPU the same
grid runs compiled, and ``test_skinny_gemm_7b_shapes_and_graph`` checks the 7B widths under a
CUDA graph.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from valora.errors import ValoraError
from valora.layers.linear import FusedLinear
from valora.ops import skinny_gemm, tuning
from valora.ops.skinny_gemm import (
    SKINNY_MAX_TOKENS,
    SMEM_BUDGET,
    SkinnyTile,
    base_linear,
    resolve_skinny_tile,
    set_skinny_gemm,
    skinny_gemm_enabled,
    skinny_gemm_switch,
    skinny_key,
    skinny_linear,
    skinny_tile,
    tile_from_record,
    use_skinny_gemm,
)
from valora.ops.skinny_tuning import skinny_candidates

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL_TILES = (SkinnyTile(16, 16, 32, 4, 2), SkinnyTile(32, 32, 16, 4, 3),
               SkinnyTile(16, 64, 64, 4, 1))


@pytest.fixture(autouse=True)
def _default_switch() -> Iterator[None]:
    set_skinny_gemm(None)
    yield
    set_skinny_gemm(None)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    error = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)
    assert error <= tolerance, f"relative error {error:.3g}"


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 32])
@pytest.mark.parametrize("tile", SMALL_TILES, ids=lambda t: f"n{t.block_n}k{t.block_k}")
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows: int, tile: SkinnyTile, bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    in_features, out_features = 72, 100  # neither on the tile grid
    x = torch.randn(rows, in_features, generator=generator).to(DEVICE)
    w = torch.randn(out_features, in_features, generator=generator).to(DEVICE)
    b = torch.randn(out_features, generator=generator).to(DEVICE) if bias else None
    block_m = max(16, 1 << (rows - 1).bit_length())
    cfg = SkinnyTile(max(tile.block_m, block_m), tile.block_n, tile.block_k, tile.num_warps,
                     tile.num_stages)
    _close(skinny_linear(x, w, b, cfg), F.linear(x, w, b), torch.float32)


@pytest.mark.parametrize("shape", [(4, 96, 160), (8, 160, 64), (5, 64, 520)],
                         ids=["narrow", "wide-k", "odd"])
def test_heuristic_tile_bf16_and_row_views(shape: tuple[int, int, int]) -> None:
    """The heuristic's own tile, bf16, and ``x`` as a row slice of a wider buffer."""
    rows, in_features, out_features = shape
    generator = torch.Generator().manual_seed(7)
    wide = torch.randn(rows, in_features + 8, generator=generator).to(DEVICE, torch.bfloat16)
    x = wide[:, 4:4 + in_features]
    w = torch.randn(out_features, in_features, generator=generator).to(DEVICE, torch.bfloat16)
    _close(skinny_linear(x, w), F.linear(x.float(), w.float()), torch.bfloat16)


def test_empty_batch_and_bad_input() -> None:
    w = torch.randn(8, 16, device=DEVICE)
    assert skinny_linear(torch.empty(0, 16, device=DEVICE), w).shape == (0, 8)
    with pytest.raises(ValoraError, match="shapes"):
        skinny_linear(torch.randn(2, 12, device=DEVICE), w)
    with pytest.raises(ValoraError, match="column stride"):
        skinny_linear(torch.randn(16, 2, device=DEVICE).t(), w)
    with pytest.raises(ValoraError, match="bias"):
        skinny_linear(torch.randn(2, 16, device=DEVICE), w, torch.randn(9, device=DEVICE))


def test_tiles_fit_the_budget_and_follow_the_measurement() -> None:
    for budget in (SMEM_BUDGET, 99 * 1024, 40 * 1024):
        for rows in (1, 8, 32, 64, 128):
            for out_f, in_f in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)):
                tile = skinny_tile(rows, out_f, in_f, 2, budget)
                if tile is None:  # two stages do not fit: F.linear serves
                    assert skinny_tile(rows, out_f, in_f, 2, 10 ** 9) is not None
                    continue
                assert tile.block_m >= rows and tile.block_m >= 16
                assert tile.num_stages >= 2 and tile.smem_bytes(2) <= budget
    assert skinny_tile(32, 4096, 11008) == SkinnyTile(32, 32, 256, 4, 6)  # down at batch 32
    assert skinny_tile(32, 22016, 4096) == SkinnyTile(32, 64, 128, 4, 3)  # gate_up
    assert skinny_tile(32, 4096, 11008, 2, 99 * 1024) == SkinnyTile(32, 32, 256, 4, 3)
    assert skinny_tile(128, 4096, 11008, 2, 40 * 1024) is None


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert not use_skinny_gemm(x, w)  # CPU tensors: F.linear
    assert torch.equal(base_linear(x, w), F.linear(x, w))
    cpu = torch.device("cpu")
    monkeypatch.delenv("VALORA_SKINNY_GEMM", raising=False)
    assert skinny_gemm_switch() == "auto" and not skinny_gemm_enabled(cpu)
    set_skinny_gemm(None)
    monkeypatch.setenv("VALORA_SKINNY_GEMM", "0")
    assert skinny_gemm_switch() == "0" and not skinny_gemm_enabled(cpu)
    set_skinny_gemm(None)
    monkeypatch.setenv("VALORA_SKINNY_GEMM", "1")
    assert skinny_gemm_enabled(cpu)  # forced on (calls on the CPU still take F.linear)
    assert not use_skinny_gemm(x, w)
    set_skinny_gemm(None)
    monkeypatch.setenv("VALORA_SKINNY_GEMM", "yes")
    with pytest.raises(ValoraError, match="VALORA_SKINNY_GEMM='yes'"):
        skinny_gemm_switch()
    set_skinny_gemm(False)
    assert not skinny_gemm_enabled(cpu)
    set_skinny_gemm(True)
    assert skinny_gemm_enabled(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_skinny_gemm_7b_shapes_and_graph() -> None:
    """Decode sizes at LLaVA-1.5-7B widths through ``FusedLinear`` (the model's path), eager and
    replayed from a CUDA graph, against ``F.linear``; 33 rows and fp32 stay on ``F.linear``."""
    torch.manual_seed(0)
    for in_f, widths in ((4096, (4096,)), (4096, (4096,) * 3), (4096, (11008,) * 2),
                         (11008, (4096,))):
        layer = FusedLinear(in_f, widths, False, tuple(f"p{i}" for i in range(len(widths))))
        layer = layer.to("cuda", torch.bfloat16)
        layer.weight.normal_(0, in_f ** -0.5)
        for rows in (1, 8, 32):
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            assert use_skinny_gemm(x, layer.weight) == skinny_gemm_enabled(x.device)
            want = F.linear(x.float(), layer.weight.float())
            _close(layer(x), want, torch.bfloat16)
            graph = torch.cuda.CUDAGraph()
            out = layer(x)
            with torch.cuda.graph(graph):
                out = layer(x)
            x.copy_(torch.randn_like(x))
            graph.replay()
            _close(out, F.linear(x.float(), layer.weight.float()), torch.bfloat16)
        big = torch.randn(SKINNY_MAX_TOKENS + 1, in_f, device="cuda", dtype=torch.bfloat16)
        assert not use_skinny_gemm(big, layer.weight)
        assert not use_skinny_gemm(big[:4].float(), layer.weight.float())
    assert skinny_gemm.skinny_gemm_enabled(torch.device("cuda")) == (
        torch.cuda.get_device_capability()[0] >= 9)


def test_tuner_writes_and_resumes_skinny_entries(tmp_path: Path) -> None:
    """``valora tune-kernels --skinny`` end to end on a tiny shape (wall-clock timing in the
    interpreter): one entry a token bucket (3 and 4 rows share one; 40 is above the skinny
    GEMM's rows), resumed without a rewrite; its record decides the tile."""
    out = tmp_path / "table.json"
    argv = ["--skinny", "--device", "cuda" if torch.cuda.is_available() else "cpu",
            "--layers", "24:16,8", "--tokens", "3,4,40", "--max-candidates", "2",
            "--repeats", "1", "--out", str(out), "--dtype", "fp32"]
    assert tuning.main(argv) == 0
    entries = json.loads(out.read_text())["entries"]
    assert set(entries) == {skinny_key(4, 24, 24)} == {"skinny:t4-i24-o24"}
    record = entries["skinny:t4-i24-o24"]
    assert isinstance(record["use"], bool) and record["time_us"]["cublas"] > 0
    tile = SkinnyTile(**record["tile"])
    assert tile.block_m >= 16 and tile.smem_bytes(4) <= SMEM_BUDGET
    assert resolve_skinny_tile(record, 3, 24, 24, 4) == (tile if record["use"] else None)
    stamp = out.stat().st_mtime_ns
    assert tuning.main(argv) == 0
    assert out.stat().st_mtime_ns == stamp


def test_table_records_decide_the_tile() -> None:
    tile = SkinnyTile(32, 32, 128, 4, 4)
    won = {"use": True, "tile": asdict(tile), "time_us": {"skinny": 1.0, "cublas": 2.0}}
    lost = {"use": False, "tile": asdict(tile), "time_us": {"skinny": 3.0, "cublas": 2.0}}
    assert resolve_skinny_tile(won, 20, 4096, 4096) == tile == tile_from_record(won)
    assert resolve_skinny_tile(lost, 20, 4096, 4096) is None  # cuBLAS won there
    assert resolve_skinny_tile(won, 20, 4096, 4096, 2, 10 * 1024) is None  # does not fit
    assert resolve_skinny_tile(None, 20, 4096, 4096) == skinny_tile(20, 4096, 4096)
    assert skinny_key(20, 4096, 12288) == "skinny:t32-i4096-o12288"
    assert all(c.smem_bytes(2) <= SMEM_BUDGET for c in skinny_candidates(32))
    assert skinny_candidates(8)[0].block_m == 16


def test_warm_up_plan_keys_binaries_and_launches_them() -> None:
    """One launch per binary: weight shape / dtype, bias or not, tile, row class (1, a multiple
    of 16, other). With the heuristic's choice, 1–16 rows share a ``BLOCK_M`` of 16 (classes: 1,
    2–15, 16) and 17–32 one of 32 (17–31, 32); a layer shape seen twice adds nothing; rows sent
    to ``F.linear`` add none. The launches run (interpreter)."""
    def heuristic(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> SkinnyTile | None:
        return skinny_tile(x.shape[0], w.shape[0], w.shape[1], x.element_size())

    w1 = torch.randn(40, 24, device=DEVICE)
    w2 = torch.randn(40, 24, device=DEVICE)
    w3 = torch.randn(24, 72, device=DEVICE)
    b3 = torch.randn(24, device=DEVICE)
    plan = skinny_gemm.skinny_warm_up_plan([(w1, None), (w2, None), (w3, b3)], heuristic)
    per_shape = [(1, 16), (2, 16), (16, 16), (17, 32), (32, 32)]
    assert sorted((tuple(w.shape), b is not None, rows, t.block_m) for w, b, rows, t in plan) == [
        ((24, 72), True, *p) for p in per_shape] + [((40, 24), False, *p) for p in per_shape]
    some = skinny_gemm.skinny_warm_up_plan(
        [(w1, None)], lambda x, w, b: heuristic(x, w, b) if x.shape[0] <= 8 else None)
    assert [rows for _, _, rows, _ in some] == [1, 2]
    assert skinny_gemm.warm_up_skinny_gemm([(w1, None), (w3, b3)], DEVICE, 1, heuristic) == 10
    assert skinny_gemm.warm_up_skinny_gemm([(w1, None)], torch.device("cpu")) == 0  # F.linear
