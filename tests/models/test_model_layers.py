"""Layer-level semantics: fused LoRA linear, RMSNorm, activations, paged attention vs dense."""

from __future__ import annotations

import math

import pytest
import torch

from valora.errors import ModelLoadError
from valora.forward_batch import AttentionMetadata
from valora.layers.activation import get_activation, silu_and_mul
from valora.layers.attention import create_attention_backend
from valora.layers.linear import FusedLinear
from valora.layers.norm import RMSNorm
from valora.ops.lora import prepare_lora_batch


def test_fused_linear_applies_each_tokens_adapter_and_correction() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = FusedLinear(6, (4, 2, 2), bias=True, slice_names=("q_proj", "k_proj", "v_proj"))
    layer.weight.copy_(torch.randn(8, 6, generator=gen))
    assert layer.bias is not None
    layer.bias.copy_(torch.randn(8, generator=gen))
    x = torch.randn(5, 6, generator=gen)
    base = x @ layer.weight.T + layer.bias
    assert torch.allclose(layer(x), base)
    slots = layer.init_lora_slots(num_slots=3, max_rank=4, dtype=torch.float32, device="cpu")
    a = torch.randn(3, 6, generator=gen)
    b = torch.randn(2, 3, generator=gen)
    slots.lora_a[1, 2, :3] = a  # slot 1 targets only v_proj (rows 6:8) with rank 3
    slots.lora_b[1, 6:8, :3] = b
    slots.ranks[1, 2] = 3
    slots.ranks_cpu[1][2] = 3
    slots.scales[1, 2] = 0.5
    lora = prepare_lora_batch(torch.tensor([1, -1, 1, 0, 1]), 3)
    correction = prepare_lora_batch(torch.tensor([-1, 1, -1, -1, -1]), 3)
    y = layer(x, lora, correction)
    delta = 0.5 * (x @ a.T) @ b.T
    expected = base.clone()
    expected[[0, 2, 4], 6:8] += delta[[0, 2, 4]]
    expected[1, 6:8] -= delta[1]
    torch.testing.assert_close(y, expected)
    assert layer.slice_rows(layer.slice_index("k_proj")) == slice(4, 6)


def test_rmsnorm_matches_transformers_and_keeps_dtype() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm, reference = RMSNorm(16, 1e-5), LlamaRMSNorm(16, eps=1e-5)
    weight = torch.rand(16) + 0.5
    norm.weight.copy_(weight)
    with torch.no_grad():
        reference.weight.copy_(weight)
    x = torch.randn(3, 16) * 5
    torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=0)
    norm_bf16 = RMSNorm(16, 1e-5).to(torch.bfloat16)
    norm_bf16.weight.fill_(1.0)
    assert norm_bf16(x.bfloat16()).dtype == torch.bfloat16


def test_activations_by_name() -> None:
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(get_activation("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    exact_gelu = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(get_activation("gelu")(x), exact_gelu)
    gate_up = torch.randn(2, 8)
    torch.testing.assert_close(silu_and_mul(gate_up),
                               torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:])
    with pytest.raises(ModelLoadError, match="unsupported activation"):
        get_activation("swiglu_v9")


def test_torch_paged_attention_equals_dense_causal_attention() -> None:
    """Two sequences (one cached + 3 new tokens, one decode) against dense softmax attention."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, page = 4, 2, 8, 2
    lens, new = [7, 5], [3, 1]
    k_all = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    v_all = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    pages = [[5, 0, 3, 7], [6, 2, 1]]
    cache = (torch.zeros(8, page, kv_heads, dim), torch.zeros(8, page, kv_heads, dim))
    slot = [[p[i // page] * page + i % page for i in range(n)]
            for p, n in zip(pages, lens, strict=True)]
    for seq in range(2):  # tokens cached by earlier steps
        cached = lens[seq] - new[seq]
        flat_k, flat_v = cache[0].view(-1, kv_heads, dim), cache[1].view(-1, kv_heads, dim)
        flat_k[slot[seq][:cached]] = k_all[seq][:cached]
        flat_v[slot[seq][:cached]] = v_all[seq][:cached]
    query = torch.randn(sum(new), heads, dim, generator=gen)
    key = torch.cat([k_all[s][lens[s] - new[s]:] for s in range(2)])
    value = torch.cat([v_all[s][lens[s] - new[s]:] for s in range(2)])
    attn = AttentionMetadata(
        query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        page_table=torch.tensor([pages[0], pages[1] + [0]], dtype=torch.int32),
        slot_mapping=torch.tensor(slot[0][4:] + slot[1][4:]), page_size=page,
        query_lens_cpu=new, seq_lens_cpu=lens)
    backend = create_attention_backend("torch")
    out = backend.forward(query, key, value, cache, attn, backend.plan(attn), scale=0.3)
    start = 0
    for seq in range(2):
        for j in range(new[seq]):
            ctx = lens[seq] - new[seq] + j + 1
            for h in range(heads):
                k = k_all[seq][:ctx, h // 2]
                weights = torch.softmax(0.3 * (k @ query[start + j, h]), dim=0)
                expected = weights @ v_all[seq][:ctx, h // 2]
                torch.testing.assert_close(out[start + j, h], expected)
        start += new[seq]
