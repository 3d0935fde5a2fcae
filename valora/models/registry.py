"""Which valora model class serves which checkpoint ``architectures[0]``.

A builder takes the parsed ``CheckpointConfig`` and the attention backend and returns an
unloaded model (its parameters are filled by ``valora.models.loader``).
"""

from __future__ import annotations

from collections.abc import Callable

from valora.errors import ModelLoadError
from valora.layers.attention import AttentionBackend
from valora.models.base import CausalLMBase
from valora.models.config import CheckpointConfig

ModelBuilder = Callable[[CheckpointConfig, AttentionBackend], CausalLMBase]

_ARCHITECTURES: dict[str, ModelBuilder] = {}


def register_architecture(name: str, builder: ModelBuilder) -> None:
    """Serve checkpoints whose ``architectures[0]`` is ``name`` with ``builder``."""
    _ARCHITECTURES[name] = builder


def _ensure_builtin() -> None:
    if _ARCHITECTURES:
        return
    from valora.models.llama import LlamaCausalLM
    from valora.models.llava import LlavaCausalLM

    register_architecture("LlavaForConditionalGeneration", LlavaCausalLM)
    register_architecture("LlamaForCausalLM", LlamaCausalLM)
    register_architecture("MistralForCausalLM", LlamaCausalLM)


def supported_architectures() -> list[str]:
    _ensure_builtin()
    return sorted(_ARCHITECTURES)


def resolve_architecture(config: CheckpointConfig) -> ModelBuilder:
    """The builder for ``config.architecture`` (``ModelLoadError`` if valora has none)."""
    _ensure_builtin()
    builder = _ARCHITECTURES.get(config.architecture)
    if builder is None:
        raise ModelLoadError(f"unsupported architecture {config.architecture!r}; "
                             f"supported: {supported_architectures()}")
    is_multimodal = config.multimodal is not None
    if config.architecture == "LlavaForConditionalGeneration" and not is_multimodal:
        raise ModelLoadError("LlavaForConditionalGeneration config lacks a vision_config")
    if config.architecture != "LlavaForConditionalGeneration" and is_multimodal:
        raise ModelLoadError(f"{config.architecture} config unexpectedly has a vision_config")
    return builder
