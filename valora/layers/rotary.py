"""Rotary position embedding (RoPE) with the "rotate half" pairing Llama checkpoints use.

Semantics, per token ``t`` at position ``p`` and head vector ``x`` of width ``D``::

    f = inv_freq(t)                    # [D/2], see valora.layers.rope_scaling
    c = cat(cos(p f), cos(p f)) * a;  s = cat(sin(p f), sin(p f)) * a   # a: attention factor
    rope(x) = x * c + cat(-x[D/2:], x[:D/2]) * s

``inv_freq`` is the same for every token except under length-dependent schemes (``dynamic``,
``longrope``): there a sequence whose context length (``seq_lens``, cached + new tokens) exceeds
the scheme's threshold rotates its new tokens with the frequencies for that length. Keys already
in the cache keep the rotation they were written with, as in Hugging Face's cached decoding.
cos/sin are computed in float32 once per forward pass and shared by all layers; every RoPE
scaling scheme lives in them, so ``apply_rotary`` is the same for all schemes.

``apply_rotary`` rotates q and k in one Triton launch (``fused_kernels.rotary``: float32 maths,
rounded once) where ``fused_select`` allows it, else runs the PyTorch twin ``apply_rotary_torch``
(which rounds each product in the model dtype, as Hugging Face does).
"""

from __future__ import annotations

import torch
from torch import nn

from valora.forward_batch import AttentionMetadata
from valora.layers import fused_select
from valora.layers.rope_scaling import RopeConfig, compute_inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query [T, H, D]`` and ``key [T, KV, D]`` by per-token ``cos``/``sin [T, D]``.

    Any token/head strides are accepted (q/k are usually column slices of the fused qkv output);
    the kernel path returns contiguous tensors. ``q_out`` / ``k_out`` (contiguous, the inputs'
    shapes and dtype): the results are written there and returned.
    """
    outs_ok = (q_out is None and k_out is None) or _outs_fit(query, key, cos, q_out, k_out)
    if (query.dim() == 3 and key.dim() == 3 and cos.dim() == 2 and sin.dim() == 2
            and query.shape[2] % 2 == 0 and key.shape[2] == query.shape[2]
            and key.shape[0] == query.shape[0] and cos.shape == sin.shape
            and cos.shape == (query.shape[0], query.shape[2]) and outs_ok
            and fused_select.usable(query, key, cos, sin)):
        from valora.layers import fused_kernels

        return fused_kernels.rotary(query, key, cos, sin, q_out, k_out)
    q, k = apply_rotary_torch(query, key, cos, sin)
    return (q if q_out is None else q_out.copy_(q)), (k if k_out is None else k_out.copy_(k))


def _outs_fit(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
              q_out: torch.Tensor | None, k_out: torch.Tensor | None) -> bool:
    """Whether the kernel can write into ``q_out`` / ``k_out`` (contiguous, result shape and
    dtype)."""
    result = torch.promote_types(query.dtype, cos.dtype)
    return all(out is None or (out.is_contiguous() and out.dtype == result
                               and out.shape == ref.shape)
               for out, ref in ((q_out, query), (k_out, key)))


def apply_rotary_torch(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch twin of ``apply_rotary`` (the reference semantics)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class RotaryEmbedding(nn.Module):
    """Computes each step's cos/sin tables from token positions (no parameters)."""

    def __init__(self, config: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        inv_freq, attention_factor = compute_inv_freq(config, head_dim)
        self.attention_factor = attention_factor
        # Plain attributes (not buffers): they stay float32 whatever dtype the model is cast to.
        self._inv_freq_cpu = inv_freq
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq_by_device[device]

    def _per_token_inv_freq(
        self, attn: AttentionMetadata, device: torch.device
    ) -> torch.Tensor | None:
        """``[T, D/2]`` frequencies if some sequence is past the length threshold, else None."""
        threshold = self.config.length_threshold
        if threshold is None or max(attn.seq_lens_cpu, default=0) <= threshold:
            return None
        rows = []
        for seq_len, query_len in zip(attn.seq_lens_cpu, attn.query_lens_cpu, strict=True):
            inv_freq, _ = compute_inv_freq(self.config, self.head_dim, seq_len)
            rows.append(inv_freq.expand(query_len, -1))
        return torch.cat(rows).to(device)

    def cos_sin(
        self, positions: torch.Tensor, attn: AttentionMetadata, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[T, head_dim]`` in ``dtype`` for the flat token ``positions [T]``."""
        per_token = self._per_token_inv_freq(attn, positions.device)
        inv_freq = per_token if per_token is not None else self._inv_freq(positions.device)
        freqs = positions[:, None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)
