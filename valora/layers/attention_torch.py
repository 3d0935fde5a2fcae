"""The ``"torch"`` paged-attention backend: plain PyTorch, any device, exact semantics.

Decodes (sequences with one new token) run together as one padded
``scaled_dot_product_attention`` call over their gathered pages, keys past each sequence's
length masked out. Every multi-token sequence (a prefill chunk) runs on its own with a causal
mask offset by the tokens already cached. Meant for CPU tests and as the reference twin of the
GPU backends; it favours clarity over speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from valora.forward_batch import AttentionMetadata
from valora.layers.attention import KVCache, output_buffer, write_kv_cache


@dataclass
class TorchAttentionPlan:
    """Per-step bookkeeping shared by all layers (built once by ``TorchPagedAttention.plan``)."""

    query_starts: list[int]
    chunk_seqs: list[int]
    decode_rows: torch.Tensor | None = None
    decode_pages: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None


def _gather_context(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """``cache[pages]`` flattened to ``[..., num_pages * page_size, KV, D]``."""
    gathered = cache[pages]
    return gathered.flatten(-4, -3)


class TorchPagedAttention:
    """Reference paged attention (see ``valora.layers.attention`` for the semantics)."""

    name = "torch"

    def plan(self, attn: AttentionMetadata) -> TorchAttentionPlan:
        starts = [0]
        for n in attn.query_lens_cpu:
            starts.append(starts[-1] + n)
        decode_seqs = [i for i, n in enumerate(attn.query_lens_cpu) if n == 1]
        chunk_seqs = [i for i, n in enumerate(attn.query_lens_cpu) if n > 1]
        plan = TorchAttentionPlan(query_starts=starts, chunk_seqs=chunk_seqs)
        if decode_seqs:
            device = attn.page_table.device
            lens = [attn.seq_lens_cpu[i] for i in decode_seqs]
            num_pages = max(-(-length // attn.page_size) for length in lens)
            index = torch.tensor(decode_seqs, device=device)
            plan.decode_rows = torch.tensor([starts[i] for i in decode_seqs], device=device)
            plan.decode_pages = attn.page_table.index_select(0, index)[:, :num_pages].long()
            key_pos = torch.arange(num_pages * attn.page_size, device=device)
            lengths = torch.tensor(lens, device=device)
            plan.decode_mask = (key_pos[None, :] < lengths[:, None])[:, None, None, :]
        return plan

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        attn: AttentionMetadata,
        plan: object,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert isinstance(plan, TorchAttentionPlan)
        write_kv_cache(key, value, kv_cache, attn.slot_mapping)
        k_cache, v_cache = kv_cache
        out = output_buffer(query, out)
        if plan.decode_rows is not None:
            assert plan.decode_pages is not None and plan.decode_mask is not None
            q = query.index_select(0, plan.decode_rows).unsqueeze(2)  # [B, H, 1, D]
            k = _gather_context(k_cache, plan.decode_pages).transpose(1, 2).to(query.dtype)
            v = _gather_context(v_cache, plan.decode_pages).transpose(1, 2).to(query.dtype)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=plan.decode_mask, scale=scale, enable_gqa=True)
            out.index_copy_(0, plan.decode_rows, o.squeeze(2))
        for i in plan.chunk_seqs:
            start, end = plan.query_starts[i], plan.query_starts[i + 1]
            out[start:end] = self._chunk(query[start:end], k_cache, v_cache, attn, i, scale)
        return out

    @staticmethod
    def _chunk(
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionMetadata,
        seq: int,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of one sequence's ``n`` new tokens over its ``L`` cached tokens."""
        n, length = query.shape[0], attn.seq_lens_cpu[seq]
        pages = attn.page_table[seq, : -(-length // attn.page_size)].long()
        k = _gather_context(k_cache, pages)[:length].transpose(0, 1).to(query.dtype)
        v = _gather_context(v_cache, pages)[:length].transpose(0, 1).to(query.dtype)
        key_pos = torch.arange(length, device=query.device)
        query_pos = torch.arange(length - n, length, device=query.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [n, L]
        o = F.scaled_dot_product_attention(
            query.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)
