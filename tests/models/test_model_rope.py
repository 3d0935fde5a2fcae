"""Our RoPE frequency maths against transformers' own init functions, scheme by scheme."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from valora.layers.rope_scaling import compute_inv_freq
from valora.layers.rotary import RotaryEmbedding, apply_rotary
from valora.models.rope_config import parse_rope_config

HEAD_DIM, MAX_POS = 16, 1024
SHORT = [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)]
LONG = [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)]

CASES: list[tuple[str, dict[str, Any], int | None]] = [
    ("default", {"rope_type": "default", "rope_theta": 10000.0}, None),
    ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, None),
    ("dynamic_short", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 100),
    ("dynamic_long", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 3000),
    ("llama3", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, None),
    ("yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 256}, None),
    ("yarn_mscale", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 256, "beta_fast": 16.0,
                     "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                     "truncate": False}, None),
    ("yarn_attention", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                        "original_max_position_embeddings": 512, "attention_factor": 1.3}, None),
    ("longrope_short", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                        "long_factor": LONG, "original_max_position_embeddings": 256}, 100),
    ("longrope_long", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                       "long_factor": LONG, "original_max_position_embeddings": 256}, 600),
    ("proportional", {"rope_type": "proportional", "rope_theta": 10000.0,
                      "partial_rotary_factor": 0.5}, None),
]


def _hf_inv_freq(params: dict[str, Any], seq_len: int | None) -> tuple[torch.Tensor, float]:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=MAX_POS, rope_parameters=dict(params))
    if params["rope_type"] == "default":
        inv_freq, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq, float(factor)


@pytest.mark.parametrize(("name", "params", "seq_len"), CASES, ids=[c[0] for c in CASES])
def test_inv_freq_matches_transformers(name: str, params: dict[str, Any],
                                       seq_len: int | None) -> None:
    ours, our_factor = compute_inv_freq(parse_rope_config({"rope_parameters": params}, MAX_POS),
                                        HEAD_DIM, seq_len)
    theirs, their_factor = _hf_inv_freq(params, seq_len)
    assert ours.shape == (HEAD_DIM // 2,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0.0)
    assert our_factor == pytest.approx(their_factor, rel=1e-9)


def test_length_dependent_schemes_switch_per_sequence() -> None:
    from valora.forward_batch import AttentionMetadata

    config = parse_rope_config({"rope_parameters": CASES[3][1]}, MAX_POS)
    rope = RotaryEmbedding(config, HEAD_DIM)
    positions = torch.tensor([5, 6, 2000])
    attn = AttentionMetadata(
        query_start_loc=torch.tensor([0, 2, 3]), seq_lens=torch.tensor([7, 2001]),
        page_table=torch.zeros(2, 1, dtype=torch.int32), slot_mapping=torch.zeros(3),
        page_size=16, query_lens_cpu=[2, 1], seq_lens_cpu=[7, 2001])
    cos, sin = rope.cos_sin(positions, attn, torch.float32)
    short_freq, _ = compute_inv_freq(config, HEAD_DIM, 7)
    long_freq, _ = compute_inv_freq(config, HEAD_DIM, 2001)
    assert not torch.allclose(short_freq, long_freq)
    torch.testing.assert_close(cos[1, : HEAD_DIM // 2], torch.cos(6 * short_freq))
    torch.testing.assert_close(sin[2, : HEAD_DIM // 2], torch.sin(2000 * long_freq))


def test_apply_rotary_matches_transformers() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, HEAD_DIM, generator=gen), torch.randn(5, 2, HEAD_DIM, generator=gen)
    cos, sin = torch.randn(5, HEAD_DIM, generator=gen), torch.randn(5, HEAD_DIM, generator=gen)
    ours_q, ours_k = apply_rotary(q, k, cos, sin)
    # transformers' layout: [batch, heads, tokens, dim] with cos/sin [batch, tokens, dim].
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        cos[None], sin[None])
    torch.testing.assert_close(ours_q, ref_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k, ref_k[0].transpose(0, 1))
