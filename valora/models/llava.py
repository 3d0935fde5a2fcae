"""LLaVA-1.5: CLIP tower → 2-layer MLP projector → rows spliced into a Llama decoder's input.

``encode_images(pixels [N, 3, S, S])`` returns ``[N, num_image_tokens, hidden]``: the tower's
hidden states at ``feature_layers`` (CLS dropped under the ``"default"`` strategy; several layers
concatenated along channels), then ``linear_2(act(linear_1(.)))``. During ``forward`` the engine
supplies these rows as ``batch.image_embeds`` together with the flat token indices they replace
(``batch.image_token_indices``); every other token is embedded normally. Rows are matched to
positions one to one, so a prefill chunk may carry any contiguous part of an image's rows.
"""

from __future__ import annotations

import torch
from torch import nn

from valora.errors import ValoraError
from valora.forward_batch import ForwardBatch
from valora.layers.activation import get_activation
from valora.layers.attention import AttentionBackend
from valora.models.base import CausalLMBase
from valora.models.clip import ClipVisionTower
from valora.models.config import CheckpointConfig, MultimodalConfig
from valora.models.llama import LlamaDecoder

# Checkpoint prefixes → module prefixes (transformers 5 in-memory names, legacy save layout,
# and transformers 4's CLIPVisionModel wrapper ``vision_model``).
_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


class LlavaProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, mm: MultimodalConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=mm.projector_bias)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=mm.projector_bias)
        self.requires_grad_(False)
        self.act = get_activation(mm.projector_hidden_act)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class LlavaCausalLM(CausalLMBase):
    """``LlavaForConditionalGeneration`` over valora's paged, LoRA-aware decoder."""

    def __init__(self, config: CheckpointConfig, backend: AttentionBackend) -> None:
        super().__init__(config)
        if config.vision is None or config.multimodal is None:
            raise ValoraError("LlavaCausalLM needs a vision config")
        self.mm = config.multimodal
        self.vision_tower = ClipVisionTower(config.vision)
        in_features = config.vision.hidden_size * len(self.mm.feature_layers)
        self.multi_modal_projector = LlavaProjector(in_features, config.text.hidden_size, self.mm)
        self.language_model = LlamaDecoder(config.text, backend)
        self._init_head(self.language_model)

    @property
    def decoder(self) -> LlamaDecoder:
        return self.language_model

    def normalize_checkpoint_key(self, key: str) -> str | None:
        for old, new in _PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key == "lm_head.weight" and self.lm_head.tied:
            return None
        return key

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features ``[N, num_image_tokens, hidden]`` in the model dtype."""
        if pixel_values.dim() != 4:
            raise ValoraError(f"pixel_values must be [N, 3, H, W], got {tuple(pixel_values.shape)}")
        states = self.vision_tower(pixel_values.to(self.device, self.dtype), self.mm.feature_layers)
        if self.mm.select_strategy == "default":
            states = [state[:, 1:] for state in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        embeds = self.language_model.embed_tokens(batch.input_ids)
        if batch.image_embeds is not None and batch.image_token_indices is not None:
            rows = batch.image_embeds.reshape(-1, embeds.shape[-1])
            if rows.shape[0] != batch.image_token_indices.shape[0]:
                raise ValoraError(f"{rows.shape[0]} image embedding rows for "
                                  f"{batch.image_token_indices.shape[0]} image token positions")
            embeds[batch.image_token_indices] = rows.to(embeds.dtype)
        return embeds
