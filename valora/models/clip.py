"""The CLIP vision tower, returning the hidden states LLaVA selects as image features.

Hidden state ``0`` is the patch + class embeddings (plus position embeddings) after the
pre-layernorm; state ``i`` is the output of encoder layer ``i``. ``forward(pixels, layers)``
returns the requested states and runs only as many encoder layers as the deepest one needs
(LLaVA-1.5 reads the second-to-last, so the last layer is never computed). ``post_layernorm`` is
loaded with the checkpoint but unused, as in LLaVA. Attention is bidirectional, plain
``nn.Linear`` projections (adapters never target the tower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from valora.layers.activation import get_activation
from valora.models.config import VisionConfig


def _linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    layer.requires_grad_(False)
    return layer


class ClipPatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` convolution without bias."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.weight = nn.Parameter(
            torch.empty(cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size),
            requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = F.conv2d(pixels, self.weight, stride=self.patch_size)  # [N, C, g, g]
        return patches.flatten(2).transpose(1, 2)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.patch_embedding = ClipPatchEmbedding(cfg)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)
        self.position_embedding.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be {self.image_size}x{self.image_size}, "
                             f"got {tuple(pixels.shape[-2:])}")
        patches = self.patch_embedding(pixels.to(self.class_embedding.dtype))
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = _linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = _linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = _linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = _linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(cfg: VisionConfig) -> nn.LayerNorm:
    norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    norm.requires_grad_(False)
    return norm


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = _layer_norm(cfg)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = _layer_norm(cfg)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ClipEncoderLayer(cfg) for _ in range(cfg.num_layers)])


class ClipVisionTower(nn.Module):
    """Module names follow the checkpoint (``embeddings``, ``pre_layrnorm``, ``encoder.layers``)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_layers = cfg.num_layers
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = _layer_norm(cfg)
        self.encoder = ClipEncoder(cfg)
        self.post_layernorm = _layer_norm(cfg)

    def forward(self, pixels: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Hidden states ``[N, 1 + patches, hidden]`` at ``layers`` (see the module doc)."""
        wanted = [index % (self.num_layers + 1) for index in layers]
        states = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.encoder.layers[: max(wanted)]:
            states.append(layer(states[-1]))
        return [states[index] for index in wanted]
