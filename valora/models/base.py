"""The model interface the engine, adapter manager and orchestrator program against.

``Model`` is the Protocol; ``CausalLMBase`` implements everything that does not depend on the
architecture (KV binding, logits, LoRA slot maps). A model's ``forward`` takes the step's
``ForwardBatch`` and returns final-normed hidden states of every token; ``compute_logits`` maps
the rows the engine picks (``batch.logits_indices``) to float32 logits.

LoRA keys are ``(layer index, PEFT module name)`` with names in ``LORA_MODULE_NAMES``.
``lora_slot_map()[key] = (slot weights of the fused linear, slice index)`` and
``lora_base_weights()[key]`` is a view of that slice's rows of the base weight, so an in-place
``W += s * B @ A`` on it merges an adapter into the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from valora.errors import ValoraError
from valora.forward_batch import ForwardBatch
from valora.layers.attention import KVCache
from valora.layers.embedding import LMHead
from valora.layers.linear import FusedLinear
from valora.models.config import CheckpointConfig
from valora.ops.lora import LoRASlotWeights

if TYPE_CHECKING:
    from valora.models.llama import LlamaDecoder

LORA_MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LoRATarget = tuple[FusedLinear, int]
LoRAKey = tuple[int, str]


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and ids the rest of valora needs, independent of the weights."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    image_token_id: int | None
    num_image_tokens: int | None
    image_size: int | None
    eos_token_ids: tuple[int, ...]
    is_multimodal: bool
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    lora_module_names: tuple[str, ...] = LORA_MODULE_NAMES


def build_spec(config: CheckpointConfig) -> ModelSpec:
    text, mm = config.text, config.multimodal
    return ModelSpec(
        architecture=config.architecture, vocab_size=text.vocab_size,
        hidden_size=text.hidden_size, num_layers=text.num_layers, num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads, head_dim=text.head_dim,
        intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings,
        image_token_id=mm.image_token_id if mm else None,
        num_image_tokens=mm.num_image_tokens if mm else None,
        image_size=config.vision.image_size if config.vision else None,
        eos_token_ids=text.eos_token_ids, is_multimodal=mm is not None,
        bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
    )


class Model(Protocol):
    """What every valora model offers (see module docstring)."""

    spec: ModelSpec

    def kv_cache_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]: ...
    def bind_kv_caches(self, caches: list[KVCache]) -> None: ...
    def forward(self, batch: ForwardBatch) -> torch.Tensor: ...
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor: ...
    def init_lora(
        self, num_slots: int, max_rank: int, dtype: torch.dtype | None = None
    ) -> None: ...
    def set_lora_overlap(self, max_tokens: int, priority: int = 0) -> None: ...
    def lora_slot_map(self) -> dict[LoRAKey, tuple[LoRASlotWeights, int]]: ...
    def lora_base_weights(self) -> dict[LoRAKey, torch.Tensor]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...


class CausalLMBase(nn.Module):
    """Architecture-independent half of a model; subclasses build ``decoder`` and the head."""

    lm_head: LMHead

    def __init__(self, config: CheckpointConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = build_spec(config)
        self.kv_caches: list[KVCache] = []

    def _init_head(self, decoder: LlamaDecoder) -> None:
        text = self.config.text
        tied = decoder.embed_tokens if text.tie_word_embeddings else None
        self.lm_head = LMHead(text.vocab_size, text.hidden_size, tied_to=tied)

    @property
    def decoder(self) -> LlamaDecoder:
        raise NotImplementedError

    def normalize_checkpoint_key(self, key: str) -> str | None:
        """Map a checkpoint tensor name to this module's naming (``None``: skip the tensor)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def kv_cache_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        """Shape of one layer's K cache (V is the same): ``[pages, page_size, KV heads, D]``."""
        return (num_pages, page_size, self.spec.num_kv_heads, self.spec.head_dim)

    def bind_kv_caches(self, caches: list[KVCache]) -> None:
        """Use ``caches`` (one ``(K, V)`` per decoder layer) from now on."""
        if len(caches) != self.spec.num_layers:
            raise ValoraError(f"need {self.spec.num_layers} (K, V) caches, got {len(caches)}")
        for index, (k, v) in enumerate(caches):
            expected = self.kv_cache_shape(int(k.shape[0]), int(k.shape[1]))
            if tuple(k.shape) != expected or tuple(v.shape) != expected or not k.is_contiguous():
                raise ValoraError(f"layer {index}: K {tuple(k.shape)} / V {tuple(v.shape)} must be "
                                  f"contiguous {expected}")
        self.kv_caches = list(caches)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """Input embeddings ``[T, hidden]`` of the step's tokens."""
        return self.decoder.embed_tokens(batch.input_ids)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if not self.kv_caches:
            raise ValoraError("bind_kv_caches must be called before forward")
        return self.decoder(self.embed(batch), batch, self.kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` of hidden states ``[N, hidden]``."""
        return self.lm_head(hidden)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValoraError(f"{self.spec.architecture} is a text-only model; it takes no images")

    def init_lora(self, num_slots: int, max_rank: int, dtype: torch.dtype | None = None) -> None:
        """Allocate empty adapter slots in every decoder linear (replacing earlier ones)."""
        seen: set[int] = set()
        for linear, _ in self.decoder.lora_targets().values():
            if id(linear) not in seen:
                seen.add(id(linear))
                linear.init_lora_slots(num_slots, max_rank, dtype or self.dtype, self.device)

    def set_lora_overlap(self, max_tokens: int, priority: int = 0) -> None:
        """Overlap every decoder linear's LoRA delta with its base GEMM on a side CUDA stream
        for calls of at most ``max_tokens`` tokens (``0``: never; see ``layers.lora_overlap``).
        ``priority``: the side stream's CUDA priority (``-1`` high, ``0`` default). Takes effect
        for CUDA graphs captured afterwards."""
        if max_tokens < 0:
            raise ValoraError(f"max_tokens must be >= 0, got {max_tokens}")
        for linear, _ in self.decoder.lora_targets().values():
            linear.lora_overlap_tokens = max_tokens
            linear.lora_stream_priority = priority

    def lora_slot_map(self) -> dict[LoRAKey, tuple[LoRASlotWeights, int]]:
        result: dict[LoRAKey, tuple[LoRASlotWeights, int]] = {}
        for key, (linear, index) in self.decoder.lora_targets().items():
            if linear.lora_weights is None:
                raise ValoraError("init_lora must be called before lora_slot_map")
            result[key] = (linear.lora_weights, index)
        return result

    def lora_base_weights(self) -> dict[LoRAKey, torch.Tensor]:
        return {key: linear.weight.data[linear.slice_rows(index)]
                for key, (linear, index) in self.decoder.lora_targets().items()}
