"""The context of one forward pass, passed explicitly to ``model.forward`` (no global state).

A step's tokens are laid out sequence after sequence: sequence ``i`` owns the flat token range
``query_start_loc[i] : query_start_loc[i+1]``. Its first new token sits at position
``seq_lens[i] - query_lens[i]``; the ``seq_lens[i] - query_lens[i]`` earlier tokens are already in
the paged KV cache. A decode is a sequence with one new token; a (chunk of a) prefill has several.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from valora.ops.lora import LoRABatch


@dataclass
class AttentionMetadata:
    """Where each sequence's K/V lives and where this step's new K/V goes.

    - ``query_start_loc``: ``[B + 1]`` int32, cumulative new-token counts.
    - ``seq_lens``: ``[B]`` int32, context length after this step (cached + new).
    - ``page_table``: ``[B, max_pages]`` int32, page ids of each sequence in order (pad: 0).
    - ``slot_mapping``: ``[T]`` int64, flat cache slot ``page * page_size + offset`` per new token.
    - ``query_lens_cpu`` / ``seq_lens_cpu``: host copies for loops that must not synchronise.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    page_table: torch.Tensor
    slot_mapping: torch.Tensor
    page_size: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class ForwardBatch:
    """Everything the model needs for one step besides its weights and KV cache tensors.

    - ``input_ids`` / ``positions``: ``[T]`` int64.
    - ``lora``: per-token adapter slots for the batched LoRA op (``None`` = no LoRA this step).
    - ``lora_correction``: mixed mode only — per-token slot of the *merged* adapter for rows that
      must subtract its delta (applied with ``scale_multiplier=-1``); ``None`` otherwise.
    - ``image_embeds`` / ``image_token_indices``: rows of projected image features and the flat
      token indices (into ``T``) whose input embedding they replace.
    - ``logits_indices``: ``[N]`` int64 flat token indices whose hidden states go to the LM head
      (the last token of each sequence that samples this step).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor
    lora: LoRABatch | None = None
    lora_correction: LoRABatch | None = None
    image_embeds: torch.Tensor | None = None
    image_token_indices: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
