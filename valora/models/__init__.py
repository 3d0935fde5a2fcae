"""Model code: Llama-family decoders and LLaVA over a paged KV cache with per-token LoRA."""

from valora.models.base import LORA_MODULE_NAMES, CausalLMBase, Model, ModelSpec
from valora.models.loader import load_model
from valora.models.registry import register_architecture, supported_architectures

__all__ = ["LORA_MODULE_NAMES", "CausalLMBase", "Model", "ModelSpec", "load_model",
           "register_architecture", "supported_architectures"]
