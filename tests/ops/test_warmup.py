"""The LoRA kernel warm-up (``valora.ops.warmup``) on the CPU.

What matters: every kernel binary a call of ``1..max_tokens`` tokens and ``1..min(T, slots)``
adapters can launch is compiled by the warm-up. Checked two ways: (1) against
``select_tile_config`` asked for every such call (heuristic, a tiny injected table and the
shipped H200 table, through a fake CUDA device name), and (2) end to end, by recording the
specialisation Triton would compile for every launch the launcher makes (kernels replaced by
recorders; Triton specialises integer arguments on ``== 1`` and on divisibility by 16, tensors
on 16-byte alignment) — for all calls, and for the warm-up's own calls. One small real run in
Triton's interpreter checks that the warm-up runs and leaves the slot weights alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import valora.ops.lora_variants as lora_variants
import valora.ops.tile_table as tile_table
import valora.ops.triton_lora as triton_lora
from valora.ops.lora import LoRABatch, LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.lora_segments import LoRASegments
from valora.ops.lora_variants import (
    ExpandVariant,
    LoRALayerShape,
    LoRAVariant,
    ShrinkVariant,
    enumerate_lora_variants,
    kernel_variants,
    key_ranks,
    plan_launches,
)
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig
from valora.ops.tile_table import TileTable, select_tile_config, tile_rank
from valora.ops.warmup import warm_up_enabled, warm_up_lora_kernels

CPU = torch.device("cpu")
FAKE_CUDA = torch.device("cuda", 0)  # a device object only: lookups never touch a GPU
TINY = LoRALayerShape(32, (8, 8), 4, torch.float32)  # flat rank 8: T's parity shows in strides
TINY_BUCKET = "r16-i32-o16-{}-s2"


def _config(block_k: int, split_k: int, expand_n: int = 16, stages: int = 2) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, block_k, split_k, 4, 2),
                      ExpandConfig(16, expand_n, 16, 4, stages))


def _tiny_table() -> TileTable:
    """Two token buckets share one config (→ one launch); split 3 vs 1 differ only in EVEN_K
    of in_features 32 with block_k 16 (split 3 → effective 2, even; split 1, block_k 64: odd)."""
    table = TileTable("Tiny GPU")
    table.put("t4-" + TINY_BUCKET.format("a1"), _config(16, 2), {})
    table.put("t16-" + TINY_BUCKET.format("a1"), _config(16, 2), {})
    table.put("t16-" + TINY_BUCKET.format("a8"), _config(16, 3), {})
    table.put("t32-" + TINY_BUCKET.format("a8"), _config(64, 1, expand_n=32, stages=3), {})
    return table


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[TileTable | None], None]:
    """``fake_gpu(table)``: CUDA devices read as an H200 whose table is ``table`` (None: the
    shipped H200 table)."""

    def use(table: TileTable | None) -> None:
        monkeypatch.setattr(tile_table, "_device_facts", lambda device: ("NVIDIA H200", 132))
        if table is not None:
            monkeypatch.setattr(tile_table, "table_for_device", lambda name: table)

    return use


def _select(device: torch.device, shape: LoRALayerShape, tokens: int, rank: int,
            adapters: int, mix: bool = False) -> TileConfig:
    """What the launcher asks for a call keyed by ``rank`` (``choose_tile_config``); ``mix``:
    slots unknown to the host (then only a mix entry's answer counts here)."""
    config, source = select_tile_config(device, tokens, rank, shape.in_features,
                                        shape.slice_widths, adapters,
                                        storage_rank=shape.max_rank, mix=mix)
    assert source == "mix" or not mix
    return config


def _mix_answer(device: torch.device, shape: LoRALayerShape, tokens: int,
                adapters: int) -> TileConfig | None:
    config, source = select_tile_config(device, tokens, shape.max_rank, shape.in_features,
                                        shape.slice_widths, adapters,
                                        storage_rank=shape.max_rank, mix=True)
    return config if source == "mix" else None


def _exhaustive(shape: LoRALayerShape, max_tokens: int, max_adapters: int,
                device: torch.device) -> set[tuple[ShrinkVariant, ExpandVariant]]:
    """The binaries of every call — every token and adapter count, every effective rank
    ``1..R`` (slots known) and the storage rank (slots unknown) — asking for each."""
    storage = shape.max_rank
    ranks = {tile_rank(r, storage) for r in range(1, storage + 1)} | {storage}
    seen = set()
    for rank in ranks:
        for tokens in range(1, max_tokens + 1):
            for adapters in range(1, min(tokens, max_adapters) + 1):
                config = _select(device, shape, tokens, rank, adapters)
                seen.add(kernel_variants(shape, config, tokens))
    for tokens in range(1, max_tokens + 1):  # slots unknown: the worst-case adapter count
        mixed = _mix_answer(device, shape, tokens, min(tokens, max_adapters))
        if mixed is not None:
            seen.add(kernel_variants(shape, mixed, tokens))
    return seen


def _check_enumeration(shape: LoRALayerShape, max_tokens: int, max_adapters: int,
                       device: torch.device) -> list[LoRAVariant]:
    variants = enumerate_lora_variants(shape, max_tokens, max_adapters, device)
    keys = [v.key for v in variants]
    assert len(keys) == len(set(keys)), "variants are not de-duplicated"
    assert set(keys) == _exhaustive(shape, max_tokens, max_adapters, device)
    for v in variants:  # each representative call is legal and selects its variant
        assert 1 <= v.num_adapters <= min(v.num_tokens, max_adapters)
        assert v.num_tokens <= max_tokens and tile_rank(v.key_rank, shape.max_rank) == v.key_rank
        config = _select(device, shape, v.num_tokens, v.key_rank, v.num_adapters, v.mix)
        assert config == v.config and kernel_variants(shape, config, v.num_tokens) == v.key
        assert not v.mix or (v.key_rank == shape.max_rank
                             and v.num_adapters == min(v.num_tokens, max_adapters))
    return variants


# ----- enumeration against select_tile_config ------------------------------------------------
@pytest.mark.parametrize("shape", [TINY, LoRALayerShape(24, (16,), 1, torch.float16),
                                   LoRALayerShape(48, (24, 8, 8), 36, torch.bfloat16)],
                         ids=["two-slices", "rank1", "qkv-rank36"])
def test_heuristic_enumeration_is_exhaustive(shape: LoRALayerShape) -> None:
    variants = _check_enumeration(shape, 70, 5, CPU)
    assert len({v.config for v in variants}) > 1
    assert {v.key_rank for v in variants} == set(key_ranks(shape.max_rank))


def test_key_ranks_are_the_launchers() -> None:
    assert key_ranks(64) == (16, 32, 64)
    assert key_ranks(48) == (16, 32, 48)
    assert key_ranks(4) == (4,)


def test_table_enumeration_is_exhaustive_and_deduplicated(
        fake_gpu: Callable[[TileTable | None], None]) -> None:
    fake_gpu(_tiny_table())
    # One adapter: t4 and t16 hold the same config, every other bucket takes one as its nearest
    # neighbour, and flat rank 16 specialises every stride alike: one variant, one launch.
    single = LoRALayerShape(32, (8, 8), 8, torch.float32)
    variants = _check_enumeration(single, 40, 1, FAKE_CUDA)
    assert len(variants) == 1 and len(plan_launches(variants)) == 1
    # More adapters and an odd flat rank: split by config, EVEN_K and the stride's parity.
    variants = _check_enumeration(TINY, 40, 3, FAKE_CUDA)
    assert {v.shrink.split_stride for v in variants} == {"D", ""}
    assert {v.shrink.even_k for v in variants} == {True, False}
    # Split 2 and split 3 (clamped to 2 by K = 32) compile the same binaries: 2 configs × 2
    # stride classes.
    assert {v.config.shrink.block_k for v in variants} == {16, 64}
    assert len(variants) == 4


def test_mix_entries_add_their_binaries(fake_gpu: Callable[[TileTable | None], None]) -> None:
    """A mix entry's tiles are enumerated (for calls with slots unknown: storage rank, worst
    adapter count) beside every regular answer."""
    table = _tiny_table()
    table.put("mix:t16-" + TINY_BUCKET.format("a8"), _config(16, 1, expand_n=64, stages=1), {})
    fake_gpu(table)
    variants = _check_enumeration(TINY, 40, 3, FAKE_CUDA)
    mixed = [v for v in variants if v.mix]
    assert mixed and all(9 <= v.num_tokens <= 16 for v in mixed)
    assert {v.config.expand.block_n for v in mixed} == {64}


def test_shipped_h200_table_covers_llava_layers(
        fake_gpu: Callable[[TileTable | None], None]) -> None:
    fake_gpu(None)
    layers = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)),
              "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}
    for in_features, widths in layers.values():
        shape = LoRALayerShape(in_features, widths, 64, torch.float16)
        variants = _check_enumeration(shape, 300, 16, FAKE_CUDA)
        assert variants and all(v.shrink.split_stride == "D" for v in variants)  # 64·J


def test_layers_that_specialise_alike_share_binaries() -> None:
    """LLaVA-7B: o_proj and down_proj (one slice), q/k/v and gate/up (K and every column
    offset divisible by 16) differ only in values Triton does not specialise on."""
    def spec(in_features: int, widths: tuple[int, ...]) -> tuple[object, ...]:
        shape = LoRALayerShape(in_features, widths, 64, torch.float16)
        return shape.shrink_spec(), shape.expand_spec()

    assert spec(4096, (4096,)) == spec(11008, (4096,))
    assert spec(4096, (4096,) * 3) == spec(4096, (11008,) * 2)
    assert spec(4096, (4096,)) != spec(4096, (4096,) * 3)
    assert spec(4096, (4096,)) != spec(4100, (4096,))


# ----- launch plan ---------------------------------------------------------------------------
def test_plan_covers_every_binary_with_fewer_launches() -> None:
    shape = TINY
    configs = [_config(16, 1), _config(16, 1, expand_n=32), _config(64, 1),
               _config(64, 1, expand_n=32)]
    variants = [LoRAVariant(*kernel_variants(shape, c, 4), c, 4, 1, 4, shape) for c in configs]
    plan = plan_launches(variants)
    assert len(plan) == 2
    assert {v.shrink for v in plan} == {v.shrink for v in variants}
    assert {v.expand for v in plan} == {v.expand for v in variants}


# ----- end to end: what Triton would compile -------------------------------------------------
def _spec(value: object) -> object:
    """Triton's specialisation of a runtime argument (module docstring)."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype), value.data_ptr() % 16 == 0
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value).__name__
    if value == 1:
        return "1"
    return ("i64" if value >= 2**31 else "i32", value % 16 == 0)


class _Recorder:
    """Stands in for a Triton kernel: records the compiled-binary key of each launch."""

    def __init__(self, kernel: Any, name: str, seen: set[tuple[object, ...]]) -> None:
        jit_options = getattr(kernel, "kwargs", None) or {}
        self.skip = set(jit_options.get("do_not_specialize")
                        or getattr(kernel, "do_not_specialize", None) or ())
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        self.name, self.seen = name, seen

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            bound = {**dict(zip(self.names, args, strict=False)), **kwargs}
            key = tuple(sorted(
                (n, v if n in self.constexprs or n not in self.names else _spec(v))
                for n, v in bound.items() if n not in self.skip))
            self.seen.add((self.name, key))

        return launch


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> set[tuple[object, ...]]:
    """Kernels replaced by recorders (nothing runs); returns the set they fill."""
    seen: set[tuple[object, ...]] = set()
    monkeypatch.setattr(triton_lora, "kernels_interpreted", lambda: True)
    for name in ("lora_shrink_kernel", "lora_expand_kernel"):
        monkeypatch.setattr(triton_lora, name, _Recorder(getattr(triton_lora, name), name, seen))
    return seen


def _mirrored(weights: LoRASlotWeights, rank: int) -> LoRASlotWeights:
    mirror = [[rank] * len(weights.slice_widths) for _ in range(weights.num_slots)]
    return LoRASlotWeights(weights.lora_a, weights.lora_b, weights.ranks, weights.scales,
                           weights.slice_widths, mirror)


def _all_calls(weights: LoRASlotWeights, max_tokens: int) -> None:
    """Every token count with every known adapter count at effective ranks around each rank
    bucket's edges, and with unknown slots (CUDA-graph batches: worst case, storage rank)."""
    storage, num_slots = weights.max_rank, weights.num_slots
    dim_in, dim_out = int(weights.lora_a.shape[3]), sum(weights.slice_widths)
    x = torch.zeros(max_tokens, dim_in, dtype=weights.lora_a.dtype)
    y = torch.zeros(max_tokens, dim_out, dtype=weights.lora_a.dtype)
    edges = {0, 1, 15, 16, 17, 31, 32, 33, storage - 1, storage}
    views = [_mirrored(weights, r) for r in sorted(e for e in edges if 0 <= e <= storage)]
    for tokens in range(1, max_tokens + 1):
        for active in range(1, min(tokens, num_slots) + 1):
            slots = torch.arange(tokens, dtype=torch.int32) % active
            for view in views:
                batch = prepare_lora_batch(slots, num_slots, "triton")
                lora_apply(y[:tokens], x[:tokens], view, batch)
        segments = LoRASegments.allocate(tokens, num_slots, CPU)
        slots = torch.arange(tokens, dtype=torch.int32) % num_slots
        segments.update(slots)  # slots unknown to the host, as in a captured graph
        lora_apply(y[:tokens], x[:tokens], weights,
                   LoRABatch(slots, num_slots, "triton", backend_data=segments))


def _all_fused_calls(weights: LoRASlotWeights, max_tokens: int) -> None:
    """``_all_calls`` for batches carrying the mixed-mode correction (the last slot merged)."""
    storage, num_slots = weights.max_rank, weights.num_slots
    merged = num_slots - 1
    dim_in, dim_out = int(weights.lora_a.shape[3]), sum(weights.slice_widths)
    x = torch.zeros(max_tokens, dim_in, dtype=weights.lora_a.dtype)
    y = torch.zeros(max_tokens, dim_out, dtype=weights.lora_a.dtype)
    edges = {1, 15, 16, 17, 31, 32, 33, storage - 1, storage}
    views = [_mirrored(weights, r) for r in sorted(e for e in edges if 1 <= e <= storage)]
    for tokens in range(1, max_tokens + 1):
        corrected = torch.full((tokens,), merged, dtype=torch.int32)
        for active in range(1, min(tokens, num_slots - 1) + 1):
            slots = torch.arange(tokens, dtype=torch.int32) % active
            for view in views:
                batch = prepare_lora_batch(slots, num_slots, "triton",
                                           correction_slots=corrected)
                lora_apply(y[:tokens], x[:tokens], view, batch)
        segments = LoRASegments.allocate(tokens, num_slots, CPU, with_correction=True)
        slots = torch.arange(tokens, dtype=torch.int32) % (num_slots - 1)
        segments.update(slots, correction_slots=corrected)  # unknown to the host (graphs)
        lora_apply(y[:tokens], x[:tokens], weights,
                   LoRABatch(slots, num_slots, "triton", backend_data=segments,
                             correction_slots=corrected))


def _layers() -> list[LoRASlotWeights]:
    """Three layer shapes, one of them twice; K = 48 and K = 40 select the same configs and
    differ only in the specialisation of K (divisible by 16 or not)."""
    return [make_slot_weights([4, 2, 0], 48, (8, 8), torch.float32, CPU, seed=1, max_rank=36),
            make_slot_weights([1, 1, 1], 24, (16,), torch.float16, CPU, seed=2),
            make_slot_weights([3, 30, 1], 48, (8, 8), torch.float32, CPU, seed=3, max_rank=36),
            make_slot_weights([5, 0, 36], 40, (8, 8), torch.float32, CPU, seed=4, max_rank=36)]


def _tiny_rank_table() -> TileTable:
    """Entries for the rank-36 layer: rank bucket 16 and 64 (36's); key rank 32 has none and
    walks up to 64."""
    table = TileTable("Tiny GPU")
    table.put("t4-r16-i64-o16-a1-s2", _config(16, 2), {})
    table.put("t16-r16-i64-o16-a8-s2", _config(64, 1, expand_n=32, stages=3), {})
    table.put("t8-r64-i64-o16-a1-s2", _config(16, 3, stages=3), {})
    table.put("t32-r64-i64-o16-a8-s2", _config(32, 1), {})
    # Graph replays (slots unknown) of 17–32 tokens: tiles of their own, 1-stage expand.
    table.put("mix:t32-r64-i64-o16-a8-s2", _config(16, 1, expand_n=64, stages=1), {})
    return table


@pytest.mark.parametrize("fused", [False, True], ids=["two-ops", "fused-correction"])
@pytest.mark.parametrize("source", ["heuristic", "table"])
def test_warm_up_launches_every_binary_the_launcher_can(
        source: str, fused: bool, recorded: set[tuple[object, ...]],
        monkeypatch: pytest.MonkeyPatch, fake_gpu: Callable[[TileTable | None], None]) -> None:
    if source == "table":  # the launcher and the warm-up look up a CUDA device's table
        fake_gpu(_tiny_rank_table())

        def on_gpu(device: torch.device, *args: Any, **kwargs: Any) -> tuple[TileConfig, str]:
            return select_tile_config(FAKE_CUDA, *args, **kwargs)

        monkeypatch.setattr(triton_lora, "select_tile_config", on_gpu)
        monkeypatch.setattr(lora_variants, "select_tile_config", on_gpu)
    layers, max_tokens = _layers(), 36
    report = warm_up_lora_kernels(layers, max_tokens, 3, CPU, fused_correction=fused)
    compiled = set(recorded)
    assert report.launches > 0 and report.layer_shapes == 3
    assert len(compiled) == report.kernels  # distinct binaries, as the report counts them
    recorded.clear()
    for weights in layers:
        _all_calls(weights, max_tokens)
        if fused:
            _all_fused_calls(weights, max_tokens)
    assert recorded <= compiled, f"never warmed up: {sorted(recorded - compiled, key=str)}"


# ----- a real run in the interpreter ---------------------------------------------------------
@pytest.fixture
def interpreter() -> Iterator[None]:
    if not triton_lora.kernels_interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
    yield


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("fused", [False, True], ids=["two-ops", "fused-correction"])
def test_warm_up_runs_and_leaves_the_weights_alone(fused: bool) -> None:
    layers = _layers()
    before = [(w.lora_a.clone(), w.lora_b.clone(), w.ranks.clone(), w.scales.clone())
              for w in layers]
    report = warm_up_lora_kernels(layers, 3, 2, CPU, fused_correction=fused)
    assert report.layer_shapes == 3 and report.variants >= report.launches > 0
    assert report.kernels >= report.launches and report.seconds > 0
    for weights, saved in zip(layers, before, strict=True):
        now = (weights.lora_a, weights.lora_b, weights.ranks, weights.scales)
        assert all(torch.equal(a, b) for a, b in zip(now, saved, strict=True))


def test_no_op_off_the_triton_backend() -> None:
    layers = _layers()
    assert not warm_up_enabled(CPU, "reference")
    assert warm_up_lora_kernels(layers, 8, 2, CPU, backend="reference").launches == 0
    assert warm_up_enabled(CPU) == triton_lora.kernels_interpreted()
    assert warm_up_lora_kernels([], 8, 2, CPU).launches == 0

