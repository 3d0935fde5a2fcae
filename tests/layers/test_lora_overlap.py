"""``FusedLinear`` with its LoRA delta overlapped on a side CUDA stream equals the serial path.

CPU: the overlap setting is inert (CPU tensors run in series) and validated; the delta added into
another tensor (``lora_into``) instead of the output, and a model whose ``o_proj`` / ``down_proj``
deltas go into the residual (``set_lora_delta_fold``) against the default. ``gpu``: eager
calls at and beyond the token limit, in bf16 and fp32, with a mixed-mode correction, with and
without ``lora_into``, and a captured CUDA graph replayed after the adapter weights change in
place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from valora.errors import ValoraError
from valora.layers import lora_overlap
from valora.layers.linear import FusedLinear
from valora.layers.lora_overlap import lora_delta_fold, set_lora_delta_fold
from valora.models.base import CausalLMBase
from valora.models.loader import load_model
from valora.ops.lora import prepare_lora_batch
from valora.testing.checkpoints import TinySpec, build_tiny_llava

WIDTHS = (48, 16, 16)


def make_linear(device: str, dtype: torch.dtype, seed: int = 0) -> FusedLinear:
    generator = torch.Generator().manual_seed(seed)
    layer = FusedLinear(32, WIDTHS, bias=True, slice_names=("q_proj", "k_proj", "v_proj"))
    layer.weight.data = (torch.randn(layer.weight.shape, generator=generator) * 0.2).to(dtype)
    assert layer.bias is not None
    layer.bias.data = torch.randn(layer.bias.shape, generator=generator).to(dtype)
    layer.to(device)
    weights = layer.init_lora_slots(4, 8, dtype, device)
    for slot, rank in enumerate((8, 3, 1, 5)):
        a = torch.randn(weights.lora_a[slot, :, :rank].shape, generator=generator) * 0.3
        b = torch.randn(weights.lora_b[slot, :, :rank].shape, generator=generator) * 0.3
        weights.lora_a[slot, :, :rank] = a.to(dtype)
        weights.lora_b[slot, :, :rank] = b.to(dtype)
        weights.ranks[slot].fill_(rank)
        weights.scales[slot].fill_(1.5 / rank)
        weights.ranks_cpu[slot] = [rank] * len(WIDTHS)
    return layer


def slots_for(tokens: int) -> list[int]:
    return [(t % 5) - 1 for t in range(tokens)]  # -1 (no adapter) and every slot


def test_overlap_is_inert_on_the_cpu() -> None:
    layer = make_linear("cpu", torch.float32)
    x = torch.randn(7, 32)
    lora = prepare_lora_batch(torch.tensor(slots_for(7)), 4, "reference")
    serial = layer(x, lora)
    layer.lora_overlap_tokens = 64
    torch.testing.assert_close(layer(x, lora), serial, rtol=0, atol=0)


def test_lora_into_adds_the_delta_there_instead() -> None:
    """``lora_into=t``: the output is the base alone and ``t`` gains exactly the delta the
    default call adds to its output (with a correction too); a misfit ``t`` is refused."""
    layer = make_linear("cpu", torch.float32)
    x = torch.randn(7, 32)
    lora = prepare_lora_batch(torch.tensor(slots_for(7)), 4, "reference")
    correction = prepare_lora_batch(torch.full((7,), 2), 4, "reference")
    base = layer(x)
    for corr in (None, correction):
        full = layer(x, lora, corr)
        target = torch.randn(7, layer.out_features)
        before = target.clone()
        out = layer(x, lora, corr, lora_into=target)
        torch.testing.assert_close(out, base, rtol=0, atol=0)
        torch.testing.assert_close(target - before, full - base, rtol=1e-5, atol=1e-5)
    untouched = torch.zeros(7, layer.out_features)
    layer(x, None, None, lora_into=untouched)  # no LoRA this call: nothing to add
    assert not untouched.any()
    for bad in (torch.zeros(6, layer.out_features), torch.zeros(7, 8),
                torch.zeros(7, layer.out_features, dtype=torch.float64)):
        with pytest.raises(ValueError, match="lora_into"):
            layer(x, lora, lora_into=bad)


def test_forward_with_delta_leaves_nothing_to_add_off_the_overlap() -> None:
    """On the CPU (no overlap) the delta is in ``y``: ``forward_with_delta`` = ``(forward, None)``."""
    layer = make_linear("cpu", torch.float32)
    layer.lora_overlap_tokens = 64
    x = torch.randn(7, 32)
    lora = prepare_lora_batch(torch.tensor(slots_for(7)), 4, "reference")
    y, delta = layer.forward_with_delta(x, lora)
    assert delta is None
    torch.testing.assert_close(y, layer(x, lora), rtol=0, atol=0)


def test_lora_delta_fold_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_overlap, "_DELTA_FOLD", [None])  # restored afterwards
    monkeypatch.delenv("VALORA_LORA_DELTA_FOLD", raising=False)
    assert not lora_delta_fold()  # off until measured on a GPU
    monkeypatch.setenv("VALORA_LORA_DELTA_FOLD", "1")
    set_lora_delta_fold(None)  # the environment is read once; None reads it again
    assert lora_delta_fold()
    set_lora_delta_fold(False)
    assert not lora_delta_fold()
    monkeypatch.setenv("VALORA_LORA_DELTA_FOLD", "maybe")
    set_lora_delta_fold(None)
    with pytest.raises(ValoraError, match="VALORA_LORA_DELTA_FOLD"):
        lora_delta_fold()


@pytest.fixture
def tiny_llava_model(tmp_path: Path) -> CausalLMBase:
    model = load_model(str(build_tiny_llava(tmp_path / "ckpt", TinySpec())),
                       dtype=torch.float32, device="cpu")
    model.init_lora(2, 4)
    return model


def test_set_lora_overlap_reaches_every_lora_linear(tiny_llava_model: CausalLMBase) -> None:
    tiny_llava_model.set_lora_overlap(16, priority=-1)
    linears = [linear for linear, _ in tiny_llava_model.decoder.lora_targets().values()]
    assert linears and all(lin.lora_overlap_tokens == 16 and lin.lora_stream_priority == -1
                           for lin in linears)
    with pytest.raises(ValoraError):
        tiny_llava_model.set_lora_overlap(-1)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("into", [False, True])
def test_gpu_overlap_matches_serial(dtype: torch.dtype, tokens: int, into: bool) -> None:
    layer = make_linear("cuda", dtype)
    x = torch.randn(tokens, 32, device="cuda").to(dtype)
    slots = torch.tensor(slots_for(tokens), device="cuda")
    lora = prepare_lora_batch(slots, 4, "triton", num_active_slots=4)
    correction = prepare_lora_batch(torch.full_like(slots, 2), 4, "triton", num_active_slots=1)
    serial = layer(x, lora, correction)
    layer.lora_overlap_tokens = 64  # 300 tokens: beyond the limit, the serial path again
    if into:  # the delta lands in a residual-like tensor; output + tensor = serial + tensor
        residual = torch.randn(tokens, layer.out_features, device="cuda").to(dtype)
        target = residual.clone()
        overlapped = layer(x, lora, correction, lora_into=target).float() + target.float()
        serial = serial.float() + residual.float()
    else:
        overlapped = layer(x, lora, correction)
    torch.cuda.synchronize()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(overlapped.float(), serial.float(), rtol=tol, atol=tol)
    if not into:  # forward_with_delta: the overlapped delta left to the caller
        y, delta = layer.forward_with_delta(x, lora, correction)
        assert (delta is None) == (tokens > 64)
        total = y if delta is None else y + delta
        torch.cuda.synchronize()
        torch.testing.assert_close(total.float(), serial.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@gpu
def test_gpu_overlap_in_a_cuda_graph_follows_adapter_changes() -> None:
    layer = make_linear("cuda", torch.float32)
    reference = make_linear("cuda", torch.float32)
    layer.lora_overlap_tokens = 64
    x = torch.randn(16, 32, device="cuda")
    lora = prepare_lora_batch(torch.tensor(slots_for(16), device="cuda"), 4, "triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x, lora)  # warm-up: compiles, builds the batch's segments
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, lora)
    for seed in (1, 2):
        fresh = make_linear("cuda", torch.float32, seed=seed)
        for target in (layer, reference):
            assert target.lora_weights is not None and fresh.lora_weights is not None
            target.lora_weights.lora_a.copy_(fresh.lora_weights.lora_a)
            target.lora_weights.lora_b.copy_(fresh.lora_weights.lora_b)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference(x, lora), rtol=1e-5, atol=1e-5)
