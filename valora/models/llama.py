"""The Llama-family decoder over a paged KV cache, and the text-only ``LlamaCausalLM``.

One decoder layer (``T`` flat tokens of every sequence in the step)::

    x = h + o_proj(attention(rope(qkv_proj(rms_norm(h)))))          # paged, causal, GQA
    h = x + down_proj(silu(gate) * up),  (gate, up) = gate_up_proj(rms_norm(x))

Each residual add is fused into the RMSNorm that follows it (``RMSNorm.forward_add``): a layer
takes and returns ``(delta, residual)`` with hidden state ``h = residual + delta``, the next
layer's input norm (or the final norm) performs the add. Same values and roundings as above.

``qkv_proj`` fuses the checkpoint's q/k/v projections and ``gate_up_proj`` its gate/up
projections (rows stacked in that order); each linear applies per-token LoRA deltas from the
step's ``ForwardBatch``. The decoder returns final-normed hidden states of every token.
"""

from __future__ import annotations

import torch
from torch import nn

from valora.errors import ModelLoadError
from valora.forward_batch import ForwardBatch
from valora.layers.activation import silu_and_mul
from valora.layers.attention import AttentionBackend, KVCache
from valora.layers.embedding import VocabEmbedding
from valora.layers.linear import FusedLinear
from valora.layers.lora_overlap import lora_delta_fold
from valora.layers.norm import RMSNorm
from valora.layers.rotary import RotaryEmbedding, apply_rotary
from valora.models.base import CausalLMBase, LoRATarget
from valora.models.config import CheckpointConfig, TextConfig


def _fold_deltas(batch: ForwardBatch) -> bool:
    """Whether this forward folds its LoRA deltas into the next ops (``valora.layers.
    lora_overlap``, "Deltas folded into the next op")."""
    return (batch.lora is not None or batch.lora_correction is not None) and lora_delta_fold()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, (q_width, kv_width, kv_width),
                                    cfg.attention_bias, ("q_proj", "k_proj", "v_proj"))
        self.o_proj = FusedLinear(q_width, (cfg.hidden_size,), cfg.attention_bias, ("o_proj",))
        self.scale = cfg.head_dim ** -0.5
        self.backend = backend

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row-wise half before attention: ``q [T, H, D]``, ``k``, ``v [T, KV, D]`` (q, k
        rotated; into ``q_out`` / ``k_out`` when given). Every output row depends on its input
        row alone."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, batch.lora, batch.lora_correction)
        q, k, v = qkv.split(self.qkv_proj.slice_widths, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin, q_out, k_out)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch,
               kv_cache: KVCache, plan: object, out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Paged attention (writes this step's K/V): ``[T, H·D]``, rows mixing across tokens;
        written into ``out`` (``[T, H·D]``, contiguous) when given."""
        num_tokens = q.shape[0]
        target = None if out is None else out.view(num_tokens, self.num_heads, self.head_dim)
        result = self.backend.forward(q, k, v, kv_cache, batch.attn, plan, self.scale, target)
        return result.reshape(num_tokens, -1)

    def output(self, attn_out: torch.Tensor, batch: ForwardBatch,
               lora_into: torch.Tensor | None = None) -> torch.Tensor:
        """Row-wise half after attention: ``o_proj`` (+ LoRA, added into ``lora_into`` instead
        when given: ``FusedLinear``)."""
        return self.o_proj(attn_out, batch.lora, batch.lora_correction, lora_into)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("silu", "swish"):
            raise ModelLoadError(f"Llama MLP activation {cfg.hidden_act!r} is not supported (silu)")
        width = cfg.intermediate_size
        self.gate_up_proj = FusedLinear(cfg.hidden_size, (width, width), cfg.mlp_bias,
                                        ("gate_proj", "up_proj"))
        self.down_proj = FusedLinear(width, (cfg.hidden_size,), cfg.mlp_bias, ("down_proj",))

    def forward(self, x: torch.Tensor, batch: ForwardBatch,
                lora_into: torch.Tensor | None = None) -> torch.Tensor:
        """``down(silu(gate) · up)`` (+ LoRA). ``lora_into`` given (the deltas folded into the
        next ops): ``gate_up_proj``'s delta enters SiLU-and-mul with its input and
        ``down_proj``'s is added into ``lora_into``."""
        if lora_into is None:
            gate_up = self.gate_up_proj(x, batch.lora, batch.lora_correction)
            return self.down_proj(silu_and_mul(gate_up), batch.lora, batch.lora_correction)
        gate_up, delta = self.gate_up_proj.forward_with_delta(x, batch.lora,
                                                              batch.lora_correction)
        return self.down_proj(silu_and_mul(gate_up, delta), batch.lora, batch.lora_correction,
                              lora_into)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, delta: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, batch: ForwardBatch, kv_cache: KVCache, plan: object
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input hidden state ``residual + delta`` (just ``delta`` when ``residual`` is None);
        returns the output hidden state as ``(delta', residual')`` with the same meaning."""
        q, k, v, residual = self.before_attention(delta, residual, cos, sin, batch)
        attn = self.self_attn.attend(q, k, v, batch, kv_cache, plan)
        return self.after_attention(attn, residual, batch)

    def before_attention(self, delta: torch.Tensor, residual: torch.Tensor | None,
                         cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                         q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
                         residual_out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm (+ residual add) and the attention's projections: ``(q, k, v,
        residual')``, q / k / residual' written into the ``*_out`` tensors when given. Row-wise
        (``valora.engine.piecewise_graphs`` captures it)."""
        if residual is None:
            x = self.input_layernorm(delta)
            if residual_out is not None:
                residual = residual_out.copy_(delta)
            else:  # the input itself, unless the layer will fold LoRA deltas into it
                residual = delta.clone() if _fold_deltas(batch) else delta
        else:
            x, residual = self.input_layernorm.forward_add(delta, residual, residual_out)
        q, k, v = self.self_attn.project(x, cos, sin, batch, q_out, k_out)
        return q, k, v, residual

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``o_proj``, post-attention norm (+ residual add) and the MLP: the layer's output as
        ``(delta', residual')``. Row-wise. With ``lora_overlap.lora_delta_fold``, ``o_proj``'s
        LoRA delta is added into ``residual`` (in place), ``gate_up_proj``'s enters the
        activation and ``down_proj``'s is added into ``residual'``."""
        into = _fold_deltas(batch)
        x, residual = self.post_attention_layernorm.forward_add(
            self.self_attn.output(attn, batch, residual if into else None), residual)
        return self.mlp(x, batch, residual if into else None), residual

    def fused_linears(self) -> tuple[FusedLinear, ...]:
        return (self.self_attn.qkv_proj, self.self_attn.o_proj,
                self.mlp.gate_up_proj, self.mlp.down_proj)


class LlamaDecoder(nn.Module):
    """Token embedding, decoder layers and the final norm (HF's ``LlamaModel``)."""

    def __init__(self, cfg: TextConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, backend) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.backend = backend

    def forward(self, embeds: torch.Tensor, batch: ForwardBatch,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden]`` from input embeddings ``[T, hidden]``."""
        cos, sin = self.rotary.cos_sin(batch.positions, batch.attn, embeds.dtype)
        plan = self.backend.plan(batch.attn)
        delta, residual = embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            delta, residual = layer(delta, residual, cos, sin, batch, kv_cache, plan)
        return self.final_norm(delta, residual)

    def final_norm(self, delta: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The final RMSNorm of the hidden state ``residual + delta`` (``delta`` if None)."""
        if residual is None:
            return self.norm(delta)
        return self.norm.forward_add(delta, residual)[0]

    def lora_targets(self) -> dict[tuple[int, str], LoRATarget]:
        """``(layer, PEFT module name) -> (fused linear, slice index)`` for every layer."""
        targets: dict[tuple[int, str], LoRATarget] = {}
        for index, layer in enumerate(self.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            for linear in layer.fused_linears():
                for j, name in enumerate(linear.slice_names):
                    targets[(index, name)] = (linear, j)
        return targets


class LlamaCausalLM(CausalLMBase):
    """``LlamaForCausalLM`` / ``MistralForCausalLM``: decoder + LM head (tied or not).

    Module names mirror the checkpoint's (``model.layers.N...``, ``lm_head.weight``).
    """

    def __init__(self, config: CheckpointConfig, backend: AttentionBackend) -> None:
        super().__init__(config)
        self.model = LlamaDecoder(config.text, backend)
        self._init_head(self.model)

    @property
    def decoder(self) -> LlamaDecoder:
        return self.model

    def normalize_checkpoint_key(self, key: str) -> str | None:
        if key == "lm_head.weight" and self.lm_head.tied:
            return None
        return key
