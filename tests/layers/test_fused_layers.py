"""Fused Triton per-layer ops (RMSNorm, residual-add + RMSNorm, rotary) against their PyTorch
twins, the selection rules, and a tiny model run both ways (SiLU-and-mul:
``test_fused_silu_and_mul.py``).

Kernel tests run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py when there is no GPU) and again on CUDA in the ``gpu``-marked variants. The
interpreter rounds to bf16 differently from the GPU, so bf16/fp16 comparisons allow two rounding
steps of the output dtype; fp32 comparisons are tight.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fused_testing import DTYPES, close, fresh_mode_one_thread, rand  # noqa: F401
from kernel_devices import DEVICES

from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.layers import fused_select
from valora.layers.norm import RMSNorm, add_rms_norm_torch, rms_norm_torch
from valora.layers.rope_scaling import RopeConfig
from valora.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_torch

# --- RMSNorm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(0, 16), (1, 1), (3, 37), (5, 256)])
def test_rms_norm_kernel_matches_twin(device: str, dtype: torch.dtype, rows: int,
                                      width: int) -> None:
    norm = RMSNorm(width, 1e-5).to(device=device, dtype=dtype)
    norm.weight.copy_(rand(width, dtype=dtype, device=device, seed=1).abs() + 0.5)
    x = rand(rows, width, dtype=dtype, device=device, seed=2)
    with fused_select.fused_layers("on"):
        assert fused_select.usable(x, norm.weight)
        got = norm(x)
    close(got, rms_norm_torch(x, norm.weight, norm.eps))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 8), (1, 24), (2, 3, 33)])
def test_add_rms_norm_kernel_matches_twin(device: str, dtype: torch.dtype,
                                          shape: tuple[int, ...]) -> None:
    width = shape[-1]
    norm = RMSNorm(width, 1e-6).to(device=device, dtype=dtype)
    norm.weight.copy_(rand(width, dtype=dtype, device=device, seed=3))
    x = rand(*shape, dtype=dtype, device=device, seed=4)
    residual = rand(*shape, dtype=dtype, device=device, seed=5)
    residual_before = residual.clone()
    with fused_select.fused_layers("on"):
        y, total = norm.forward_add(x, residual)
    want_y, want_total = add_rms_norm_torch(x, residual, norm.weight, norm.eps)
    close(total, want_total)
    close(y, want_y)
    assert torch.equal(residual, residual_before)  # never updated in place


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_row_strided_input_is_handled(device: str) -> None:
    """Rows with a stride (a column slice) go through the kernel without a copy of semantics."""
    norm = RMSNorm(20, 1e-5).to(device)
    norm.weight.fill_(1.5)
    wide = rand(4, 50, dtype=torch.float32, device=device, seed=6)
    x = wide[:, 5:25]
    with fused_select.fused_layers("on"):
        got = norm(x)
    close(got, rms_norm_torch(x, norm.weight, norm.eps))


# --- rotary ----------------------------------------------------------------------------------

def qkv_views(tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k as the model makes them: column slices of one fused qkv output (token-strided)."""
    qkv = rand(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device, seed=seed)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    return q, k


def cos_sin_for(tokens: int, dim: int, dtype: torch.dtype, device: str,
                rope: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    config = RopeConfig(**(rope or {}))
    rotary = RotaryEmbedding(config, dim)
    positions = torch.arange(tokens, device=device) * 37 + 3
    attn = SimpleNamespace(seq_lens_cpu=[int(positions.max()) + 1 if tokens else 0],
                           query_lens_cpu=[tokens])
    return rotary.cos_sin(positions, attn, dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,dim", [
    (0, 2, 1, 8), (1, 1, 1, 2), (3, 4, 2, 16), (5, 5, 1, 12), (2, 32, 32, 8), (3, 3, 3, 20)])
def test_rotary_kernel_matches_twin(device: str, dtype: torch.dtype, tokens: int, heads: int,
                                    kv_heads: int, dim: int) -> None:
    q, k = qkv_views(tokens, heads, kv_heads, dim, dtype, device, seed=7)
    cos, sin = cos_sin_for(tokens, dim, dtype, device)
    with fused_select.fused_layers("on"):
        got_q, got_k = apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_torch(q, k, cos, sin)
    # The twin rounds q·cos and rotate_half(q)·sin before adding them: where they cancel, its
    # error is a rounding step of the inputs' magnitude, not of the result's.
    atol16 = 2 ** -6 * float(q.abs().amax()) if tokens else 0.0
    close(got_q, want_q, atol16)
    close(got_k, want_k, atol16)


ROPE_VARIANTS: list[dict[str, Any]] = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "theta": 500000.0, "factor": 8.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 16},
    {"rope_type": "proportional", "partial_rotary_factor": 0.5},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope", ROPE_VARIANTS, ids=[r["rope_type"] for r in ROPE_VARIANTS])
def test_rotary_kernel_with_scaled_cos_sin(device: str, rope: dict[str, Any]) -> None:
    """Every scaling scheme lives in the shared cos/sin tables; the kernel just consumes them."""
    q, k = qkv_views(4, 4, 2, 16, torch.float32, device, seed=8)
    cos, sin = cos_sin_for(4, 16, torch.float32, device, rope)
    with fused_select.fused_layers("on"):
        got_q, got_k = apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_torch(q, k, cos, sin)
    close(got_q, want_q)
    close(got_k, want_k)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_with_strided_last_dim_falls_back_to_twin(device: str) -> None:
    base = rand(3, 2, 16, dtype=torch.float32, device=device, seed=9)
    q = base[..., ::2]  # last-dim stride 2: the kernels do not take it
    k = q[:, :1]
    cos, sin = cos_sin_for(3, 8, torch.float32, device)
    with fused_select.fused_layers("on"):
        assert not fused_select.usable(q, k, cos, sin)
        got_q, got_k = apply_rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary_torch(q, k, cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


# --- outputs into given buffers (the piecewise graphs' static buffers) -------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["on", "off"], ids=["kernel", "twin"])
@pytest.mark.parametrize("in_place", [False, True], ids=["other-buffer", "into-residual"])
def test_add_rms_norm_writes_the_sum_where_asked(device: str, mode: str, in_place: bool) -> None:
    """``residual_out``: the sum lands there (also when it is ``residual`` itself, each row read
    before it is written) and is what comes back; the normed output is unchanged."""
    norm = RMSNorm(24, 1e-6).to(device=device, dtype=torch.float32)
    norm.weight.copy_(rand(24, dtype=torch.float32, device=device, seed=30))
    x = rand(5, 24, dtype=torch.float32, device=device, seed=31)
    residual = rand(5, 24, dtype=torch.float32, device=device, seed=32)
    want_y, want_total = add_rms_norm_torch(x, residual, norm.weight, norm.eps)
    out = residual if in_place else torch.full_like(residual, float("nan"))
    with fused_select.fused_layers(mode):
        y, total = norm.forward_add(x, residual, residual_out=out)
    assert total.data_ptr() == out.data_ptr()
    close(total, want_total)
    close(y, want_y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["on", "off"], ids=["kernel", "twin"])
def test_rotary_writes_into_given_buffers(device: str, mode: str) -> None:
    q, k = qkv_views(3, 4, 2, 16, torch.float32, device, seed=33)
    cos, sin = cos_sin_for(3, 16, torch.float32, device)
    q_out = torch.full((3, 4, 16), float("nan"), device=device)
    k_out = torch.full((3, 2, 16), float("nan"), device=device)
    with fused_select.fused_layers(mode):
        got_q, got_k = apply_rotary(q, k, cos, sin, q_out, k_out)
    assert got_q.data_ptr() == q_out.data_ptr() and got_k.data_ptr() == k_out.data_ptr()
    want_q, want_k = apply_rotary_torch(q, k, cos, sin)
    close(q_out, want_q)
    close(k_out, want_k)


# --- selection -------------------------------------------------------------------------------

def test_mode_parsing_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fused_select.parse_mode("") == "auto"
    assert fused_select.parse_mode(" 1 ") == "on"
    assert fused_select.parse_mode("OFF") == "off"
    with pytest.raises(ValueError, match="VALORA_FUSED_LAYERS"):
        fused_select.parse_mode("maybe")
    monkeypatch.setenv(fused_select.ENV_VAR, "0")
    fused_select.set_fused_layers_mode(None)
    assert fused_select.fused_layers_mode() == "off"
    monkeypatch.setenv(fused_select.ENV_VAR, "1")
    assert fused_select.fused_layers_mode() == "off"  # read once until reset
    fused_select.set_fused_layers_mode(None)
    assert fused_select.fused_layers_mode() == "on"
    with fused_select.fused_layers("off"):
        assert fused_select.fused_layers_mode() == "off"
    assert fused_select.fused_layers_mode() == "on"


def test_auto_mode_uses_twins_on_cpu_and_rejects_what_kernels_cannot_take() -> None:
    x = torch.randn(2, 8)
    with fused_select.fused_layers("auto"):
        assert not fused_select.usable(x)
    with fused_select.fused_layers("on"):
        assert fused_select.usable(x)
        assert not fused_select.usable(x, x.double())  # mixed dtypes
        assert not fused_select.usable(x.double())  # float64
        assert not fused_select.usable(x.t())  # last-dim stride
        leaf = x.clone().requires_grad_(True)
        assert not fused_select.usable(leaf)  # autograd would record through it
        with torch.no_grad():
            assert fused_select.usable(leaf)
    with fused_select.fused_layers("off"):
        assert not fused_select.usable(x)


def test_auto_mode_leaves_cpu_results_bit_identical() -> None:
    """On the CPU (auto) the layers are exactly their twins: CPU parity with HF cannot move."""
    norm = RMSNorm(24, 1e-5)
    norm.weight.copy_(torch.rand(24) + 0.5)
    x, residual = torch.randn(3, 24), torch.randn(3, 24)
    assert torch.equal(norm(x), rms_norm_torch(x, norm.weight, norm.eps))
    y, total = norm.forward_add(x, residual)
    assert torch.equal(total, residual + x)
    assert torch.equal(y, rms_norm_torch(residual + x, norm.weight, norm.eps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_mode_picks_kernels_on_cuda() -> None:
    x = torch.randn(2, 8, device="cuda")
    with fused_select.fused_layers("auto"):
        assert fused_select.usable(x) == fused_select.triton_available()


# --- a tiny model, fused vs stock ------------------------------------------------------------

def prefill_batch(lengths: list[int], device: str, page_size: int = 4) -> ForwardBatch:
    ids, positions, slots, starts, tables = [], [], [], [0], []
    next_page = 0
    for n in lengths:
        pages = list(range(next_page, next_page + -(-n // page_size)))
        next_page += len(pages)
        for pos in range(n):
            ids.append((7 * pos + 3 * len(starts)) % 300 + 1)
            positions.append(pos)
            slots.append(pages[pos // page_size] * page_size + pos % page_size)
        starts.append(len(ids))
        tables.append(pages)
    width = max(len(t) for t in tables)

    def i32(v: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=device)

    attn = AttentionMetadata(
        query_start_loc=i32(starts), seq_lens=i32(lengths),
        page_table=i32([t + [0] * (width - len(t)) for t in tables]),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device), page_size=page_size,
        query_lens_cpu=list(lengths), seq_lens_cpu=list(lengths))
    return ForwardBatch(input_ids=torch.tensor(ids, device=device),
                        positions=torch.tensor(positions, device=device), attn=attn,
                        logits_indices=torch.tensor(starts[1:], device=device) - 1)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from valora.testing.checkpoints import TinySpec, build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("fused_tiny_llama"), TinySpec(seed=21))


def run_model(path: Path, device: str, dtype: torch.dtype, mode: fused_select.FusedMode
              ) -> torch.Tensor:
    from valora.models import load_model

    model = load_model(str(path), dtype=dtype, device=device)
    shape = model.kv_cache_shape(16, 4)
    model.bind_kv_caches([(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(model.spec.num_layers)])
    with fused_select.fused_layers(mode), torch.inference_mode():
        return model.forward(prefill_batch([5, 3, 1], device)).float()


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float32, marks=DEVICES[0].marks),
    pytest.param("cuda", torch.float32, marks=DEVICES[1].marks),
    pytest.param("cuda", torch.bfloat16, marks=DEVICES[1].marks),
])
def test_tiny_model_fused_matches_stock(tiny_llama: Path, device: str,
                                        dtype: torch.dtype) -> None:
    stock = run_model(tiny_llama, device, dtype, "off")
    fused = run_model(tiny_llama, device, dtype, "on")
    err = float((fused - stock).double().norm() / stock.double().norm())
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("device,dtype", [
    pytest.param("cpu", torch.float32, marks=DEVICES[0].marks),
    pytest.param("cuda", torch.bfloat16, marks=DEVICES[1].marks),
])
def test_tiny_model_with_the_one_launch_kv_write(tiny_llama: Path, device: str,
                                                 dtype: torch.dtype) -> None:
    """``VALORA_FUSED_KV_WRITE`` on: the attention reads back exactly what two ``index_copy_``
    would have written (``tests/layers/test_fused_kv_write.py`` for the kernel itself)."""
    try:
        fused_select.set_fused_kv_write(False)
        twin = run_model(tiny_llama, device, dtype, "on")
        fused_select.set_fused_kv_write(True)
        fused = run_model(tiny_llama, device, dtype, "on")
    finally:
        fused_select.set_fused_kv_write(None)
    torch.testing.assert_close(fused, twin, rtol=0, atol=0)


def test_environment_switch_is_documented() -> None:
    assert fused_select.ENV_VAR == "VALORA_FUSED_LAYERS"
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
