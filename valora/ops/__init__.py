"""Compute ops. Each op has a launcher with checks, a Semantics docstring and a pure-PyTorch twin
in ``valora.ops.reference``."""

from valora.ops.lora import LoRABatch, LoRASlotWeights, lora_apply, prepare_lora_batch

__all__ = ["LoRABatch", "LoRASlotWeights", "lora_apply", "prepare_lora_batch"]
