"""The single-launch (fused) Triton LoRA kernel against the pure-PyTorch twin (CPU: interpreter).

Same semantics as the two-launch path: mixed ranks incl. 1 and rank-0 slices, rows without
adapter untouched, GQA / five-slice layouts (two launches), K not a multiple of the K block,
column groups of one and several blocks; and the switch through ``fused_max_tokens`` and tables.
"""

from __future__ import annotations

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error
from test_ops_lora_triton import DEVICE, SLICES, make_case, mixed_ranks

from valora.ops.lora import prepare_lora_batch
from valora.ops.tile_config import (
    ExpandConfig,
    FusedConfig,
    ShrinkConfig,
    TileConfig,
    heuristic_fused_config,
)
from valora.ops.triton_lora import lora_apply_triton

UNUSED = (ShrinkConfig(16, 16, 16, 1, 4, 2), ExpandConfig(16, 16, 16, 4, 2))


def _run(layout: str, dtype: torch.dtype, config: TileConfig | None,
         fused_max_tokens: int | None = None, in_features: int = 48,
         ranks: list[list[int]] | None = None) -> None:
    slices = SLICES[layout]
    ranks = ranks or mixed_ranks(6, len(slices))
    weights, slots, x, y = make_case(23, slices, ranks, dtype,
                                     "zipf", in_features=in_features, seed=5)
    batch = prepare_lora_batch(slots.to(DEVICE), weights.num_slots, "triton")
    out = y.clone()
    lora_apply_triton(out, x, weights, batch, -0.5, config, fused_max_tokens)
    ref = reference_output(y, x, weights, slots, weights.num_slots, -0.5)
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    untouched = (slots < 0).to(out.device)
    assert torch.equal(out[untouched], y[untouched]), "rows without adapter changed"


@pytest.mark.parametrize("col_blocks", [1, 3])
@pytest.mark.parametrize("layout", ["qkv_gqa", "five"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_matches_twin(dtype: torch.dtype, layout: str, col_blocks: int) -> None:
    fused = FusedConfig(16, 16, 32, col_blocks, 4, 2)  # K = 48: a masked K tail
    _run(layout, dtype, TileConfig(*UNUSED, fused))


def test_fused_full_rank_path() -> None:
    """Every targeted slice at the storage rank (B loads without a rank mask); one untargeted."""
    ranks = [[16, 16, 16] for _ in range(5)]
    ranks[2][1] = 0
    _run("qkv_gqa", torch.bfloat16, TileConfig(*UNUSED, FusedConfig(16, 16, 16, 2, 4, 2)),
         ranks=ranks)


def test_fused_even_k_and_heuristic_switch() -> None:
    _run("gate_up", torch.float16, None, fused_max_tokens=256, in_features=64)


def test_fused_config_json_round_trip_and_heuristic_bounds() -> None:
    config = TileConfig(*UNUSED, FusedConfig(16, 128, 128, 4, 4, 3))
    assert TileConfig.from_json(config.to_json()) == config
    assert TileConfig.from_json(TileConfig(*UNUSED).to_json()).fused is None
    for tokens in (1, 16, 64, 256):
        cfg = heuristic_fused_config(tokens, 64, 4096, (11008, 11008), 32)
        assert 1 <= cfg.col_blocks <= 32 and cfg.block_m in (16, 32, 64)
