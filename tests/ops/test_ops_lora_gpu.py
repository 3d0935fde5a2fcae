"""GPU-only checks of the Triton LoRA backend (run on the GPU machine: ``pytest -m gpu``).

CUDA-graph capture and replay with new slots written in place; the bigger bf16 grid at real
layer widths with relative error ≤ 1e-2 against the fp32 twin; every tile candidate the tuner may
put in a table computes the right result, the persistent expand's at a prefill size; programmatic dependent launches (``VALORA_PDL``, on
Hopper GPUs) give bit-identical results to plain ones, eagerly and replayed from a graph of
chained ops.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import reference_output, relative_error

from valora.ops.lora import LoRABatch, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights, make_token_slots
from valora.ops.lora_segments import LoRASegments
from valora.ops.pdl import PDL_MODES, pdl_levels, pdl_supported, set_pdl
from valora.ops.tile_candidates import EXPAND_TILES, PERSISTENT_TILES, SHRINK_TILES
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig
from valora.ops.triton_lora import lora_apply_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = "cuda"
MIXED = [8, 16, 32, 64, 128]
LAYERS = {"q": (4096, (4096,)), "qkv_gqa": (4096, (4096, 1024, 1024)),
          "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}


def _inputs(num_tokens: int, in_features: int, width: int, seed: int):
    generator = torch.Generator(device=CUDA).manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=generator, device=CUDA).bfloat16()
    y = torch.randn(num_tokens, width, generator=generator, device=CUDA).bfloat16()
    return x, y


def _static_batch(slots: torch.Tensor, num_slots: int) -> tuple[LoRABatch, LoRASegments]:
    segments = LoRASegments.allocate(slots.shape[0], num_slots, CUDA, -1)
    segments.update(slots)
    return LoRABatch(slots, num_slots, "triton", segments), segments


@pytest.mark.parametrize("b_layout", ["column", "rank"])
@pytest.mark.parametrize("capture_prepare", [False, True])
def test_cuda_graph_replay_with_new_slots(capture_prepare: bool, b_layout: str) -> None:
    """Capture once; each step writes new slots (and inputs) in place, replays, and matches
    (``lora_b`` stored either way)."""
    num_tokens, num_slots, widths = 96, 12, (512, 128, 128)
    weights = make_slot_weights([MIXED[s % 5] for s in range(num_slots)], 512, widths,
                                torch.bfloat16, CUDA, 0, b_layout=b_layout)
    generator = torch.Generator().manual_seed(0)
    static_slots = make_token_slots(num_tokens, num_slots, "uniform", generator).to(CUDA)
    batch, segments = _static_batch(static_slots, num_slots)
    x, y = _inputs(num_tokens, 512, sum(widths), 0)
    lora_apply(y.clone(), x, weights, batch)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if capture_prepare:
            segments.update(static_slots)
        lora_apply(y, x, weights, batch)
    for step, popularity in enumerate(["zipf", "one_hot", "distinct", "identical"]):
        slots = make_token_slots(num_tokens, num_slots, popularity, generator, 0.25)
        static_slots.copy_(slots)
        if not capture_prepare:
            segments.update(static_slots)
        new_x, new_y = _inputs(num_tokens, 512, sum(widths), step + 1)
        x.copy_(new_x)
        y.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_output(new_y, new_x, weights, slots, num_slots, device=CUDA)
        assert relative_error(y, ref) <= 1e-2
        none = (slots < 0).to(CUDA)
        assert torch.equal(y[none], new_y[none])


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 1000])
@pytest.mark.parametrize(("rank_kind", "popularity"),
                         [("mixed", "zipf"), ("mixed", "distinct"), ("uniform16", "one_hot")])
def test_bf16_grid_at_layer_widths(layer: str, num_tokens: int, rank_kind: str,
                                   popularity: str) -> None:
    in_features, widths = LAYERS[layer]
    ranks = [MIXED[(s + 2) % 5] for s in range(32)] if rank_kind == "mixed" else [16] * 32
    weights = make_slot_weights(ranks, in_features, widths, torch.bfloat16, CUDA, num_tokens)
    generator = torch.Generator().manual_seed(num_tokens)
    slots = make_token_slots(num_tokens, 32, popularity, generator, 0.1)
    x, y = _inputs(num_tokens, in_features, sum(widths), num_tokens)
    out = y.clone()
    lora_apply(out, x, weights, prepare_lora_batch(slots.to(CUDA), 32, "triton"))
    ref = reference_output(y, x, weights, slots, 32, device=CUDA)
    assert relative_error(out, ref) <= 1e-2


@pytest.mark.parametrize("in_features", [4096, 1000])
def test_every_tile_candidate_is_correct(in_features: int) -> None:
    widths = (1024, 256, 256)
    weights = make_slot_weights([MIXED[s % 5] for s in range(8)], in_features, widths,
                                torch.bfloat16, CUDA, 7)
    generator = torch.Generator().manual_seed(7)
    slots = make_token_slots(300, 8, "zipf", generator, 0.1)
    x, y = _inputs(300, in_features, sum(widths), 7)
    ref = reference_output(y, x, weights, slots, 8, device=CUDA)
    batch = prepare_lora_batch(slots.to(CUDA), 8, "triton")
    configs = [TileConfig(ShrinkConfig(*s[:3], split, *s[3:]), ExpandConfig(*e))
               for s, e in zip(SHRINK_TILES, EXPAND_TILES[:len(SHRINK_TILES)], strict=True)
               for split in (1, 3)]
    configs += [TileConfig(ShrinkConfig(16, 16, 256, 8, 4, 3), ExpandConfig(*e))
                for e in EXPAND_TILES[len(SHRINK_TILES):]]
    for config in configs:
        out = y.clone()
        lora_apply_triton(out, x, weights, batch, 1.0, config=config)
        assert relative_error(out, ref) <= 1e-2, config


@pytest.mark.parametrize("split", [1, 2])
def test_every_persistent_tile_is_correct(split: int) -> None:
    """The persistent expand's tuner tiles (``tile_candidates.PERSISTENT_TILES``) at a prefill
    size over rank-major slots of storage rank 64 — the setting they were measured in — with one
    and two split-K planes from the shrink."""
    widths = (1024, 256, 256)
    weights = make_slot_weights([8, 16, 32, 64, 64, 16, 32, 8], 4096, widths, torch.bfloat16,
                                CUDA, 11, b_layout="rank")
    slots = make_token_slots(2048, 8, "uniform", torch.Generator().manual_seed(11), 0.1)
    x, y = _inputs(2048, 4096, sum(widths), 11)
    ref = reference_output(y, x, weights, slots, 8, device=CUDA)
    batch = prepare_lora_batch(slots.to(CUDA), 8, "triton")
    for tile in PERSISTENT_TILES:
        config = TileConfig(ShrinkConfig(64, 64, 64, split, 4, 4),
                            ExpandConfig(*tile[:5], persistent=tile[5]))
        out = y.clone()
        lora_apply_triton(out, x, weights, batch, 1.0, config=config)
        assert relative_error(out, ref) <= 1e-2, config


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes_on_gpu(dtype: torch.dtype) -> None:
    weights = make_slot_weights([MIXED[s % 5] for s in range(6)], 1024, (512, 512), dtype,
                                CUDA, 3)
    generator = torch.Generator().manual_seed(3)
    slots = make_token_slots(64, 6, "uniform", generator, 0.2)
    x = torch.randn(64, 1024, device=CUDA, dtype=dtype)
    y = torch.randn(64, 1024, device=CUDA, dtype=dtype)
    out = y.clone()
    lora_apply(out, x, weights, prepare_lora_batch(slots.to(CUDA), 6, "triton"))
    ref = reference_output(y, x, weights, slots, 6, device=CUDA)
    assert relative_error(out, ref) <= (1e-5 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("num_tokens", [1, 32, 300])
@pytest.mark.parametrize("correction", [False, True])
def test_programmatic_dependent_launch_is_bit_identical(num_tokens: int, correction: bool) -> None:
    """Three LoRA ops chained through their outputs (each op's ``y`` is the next one's ``x``, as
    layers are), ranks below and above a rank chunk (1, 8, 13, 16, 40, 64), some rows without an
    adapter; in every PDL mode, eagerly and replayed from a CUDA graph: the bits of ``"off"``."""
    if not pdl_supported(torch.device(CUDA)):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 (Hopper)")
    num_slots, width = 6, 256
    weights = [make_slot_weights([1, 8, 13, 16, 40, 64], width, (width,), torch.bfloat16, CUDA,
                                 seed) for seed in range(3)]
    generator = torch.Generator().manual_seed(num_tokens)
    slots = make_token_slots(num_tokens, num_slots, "zipf", generator, 0.2)
    corr = None
    if correction:  # mixed mode: slot 2 merged; its own rows carry no term, base rows correct
        corr = torch.where(slots == 2, -1, 2).to(torch.int32)
        slots = torch.where(slots == 2, -1, slots).to(torch.int32)
    batch = prepare_lora_batch(slots, num_slots, "triton", correction_slots=corr)
    device_batch = prepare_lora_batch(
        slots.to(CUDA), num_slots, "triton", active_slots=batch.active_slots,
        correction_slots=corr.to(CUDA) if corr is not None else None,
        correction_slot=batch.correction_slot)
    x0, _ = _inputs(num_tokens, width, width, 7)
    buffers = [x0.clone()] + [torch.empty_like(x0) for _ in weights]

    def chain() -> None:
        for i, w in enumerate(weights):
            buffers[i + 1].copy_(buffers[i])
            lora_apply(buffers[i + 1], buffers[i], w, device_batch)

    results = {}
    replayed = {}
    try:
        for mode in PDL_MODES:
            set_pdl(mode)
            assert pdl_levels(torch.device(CUDA))[1] == (0 if mode == "off" else 2)
            chain()
            torch.cuda.synchronize()
            results[mode] = buffers[-1].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                chain()
            for _ in range(3):
                buffers[-1].zero_()
                graph.replay()
            torch.cuda.synchronize()
            replayed[mode] = buffers[-1].clone()
    finally:
        set_pdl(None)
    for mode in PDL_MODES:
        assert torch.equal(results[mode], results["off"]), mode
        assert torch.equal(replayed[mode], results["off"]), mode
