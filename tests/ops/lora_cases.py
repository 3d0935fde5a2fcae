"""Helpers for the LoRA op tests: fp32 twin results and error measures."""

from __future__ import annotations

import torch

from valora.ops.lora import LoRABatch, LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.tile_config import BLOCK_M_CHOICES, TileConfig


def as_fp32(weights: LoRASlotWeights) -> LoRASlotWeights:
    return LoRASlotWeights(weights.lora_a.float(), weights.lora_b.float(), weights.ranks,
                           weights.scales, weights.slice_widths,
                           [list(r) for r in weights.ranks_cpu])


def reference_output(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
                     slots: torch.Tensor, num_slots: int, multiplier: float = 1.0,
                     device: str = "cpu") -> torch.Tensor:
    """``y + LoRA(x)`` by the pure-PyTorch twin, in fp32 (on ``device``; result on the CPU)."""
    out = y.detach().to(device, torch.float32).clone()
    fp32 = LoRASlotWeights(weights.lora_a.to(device, torch.float32),
                           weights.lora_b.to(device, torch.float32), weights.ranks.to(device),
                           weights.scales.to(device), weights.slice_widths,
                           [list(r) for r in weights.ranks_cpu])
    batch = prepare_lora_batch(slots.to(device), num_slots, "reference")
    lora_apply(out, x.detach().to(device, torch.float32), fp32, batch, multiplier)
    return out.cpu()


def triton_output(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights,
                  slots: torch.Tensor, num_slots: int, multiplier: float = 1.0) -> torch.Tensor:
    out = y.clone()
    batch: LoRABatch = prepare_lora_batch(slots.to(x.device), num_slots, "triton")
    lora_apply(out, x, weights, batch, multiplier)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32 on the CPU (either tensor may live on any device)."""
    out32 = out.detach().float().cpu()
    ref32 = ref.detach().float().cpu()
    assert torch.isfinite(out32).all(), "non-finite output"
    return float((out32 - ref32).norm() / ref32.norm().clamp_min(1e-12))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def assert_valid_tile_config(config: TileConfig) -> None:
    """Block sizes powers of two ≥ 16 (``tl.dot``), ``block_m`` one of the tile lists', split ≥ 1."""
    for block in (config.shrink.block_n, config.shrink.block_k, config.expand.block_n,
                  config.expand.block_k):
        assert block >= 16 and block & (block - 1) == 0
    assert config.shrink.block_m in BLOCK_M_CHOICES and config.expand.block_m in BLOCK_M_CHOICES
    assert config.shrink.split_k >= 1
