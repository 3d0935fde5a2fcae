"""Test harness: prefill and greedy-decode sequences of a valora model over a paged KV cache.

``Stepper`` hands out pages from a shuffled free list (page 0 stays the null page), lays out
prefill chunks and decode steps as ``ForwardBatch`` es exactly as the engine does, and runs them
through ``model.forward``, a ``CudaGraphRunner`` (decode steps) or a ``PiecewiseGraphRunner``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from valora.engine.cuda_graph import CudaGraphRunner
from valora.engine.piecewise_graphs import PiecewiseGraphRunner
from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.models.base import CausalLMBase
from valora.models.loader import load_model
from valora.ops.lora import LoRABatch, prepare_lora_batch


@dataclass
class Sequence:
    tokens: list[int]
    lora_slot: int = -1
    correction_slot: int = -1
    image_rows: torch.Tensor | None = None
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0


class Stepper:
    """Owns the KV cache of ``model`` and builds its steps (see module docstring)."""

    def __init__(self, model: CausalLMBase, num_pages: int, page_size: int, num_lora_slots: int,
                 lora_backend: str, seed: int = 0) -> None:
        self.model, self.page_size = model, page_size
        self.num_lora_slots, self.lora_backend = num_lora_slots, lora_backend
        shape = model.kv_cache_shape(num_pages, page_size)
        device, dtype = model.device, model.dtype
        model.bind_kv_caches([(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
                              for _ in range(model.spec.num_layers)])
        self.free = list(range(1, num_pages))
        random.Random(seed).shuffle(self.free)

    def build(self, seqs: list[Sequence], counts: list[int], width: int | None = None
              ) -> ForwardBatch:
        """The step feeding ``counts[i]`` new tokens of ``seqs[i]`` (page tables padded to
        ``width`` pages when given)."""
        device = self.model.device
        ids, positions, slots, starts, lens, tables = [], [], [], [0], [], []
        lora: list[int] = []
        correction: list[int] = []
        image_index: list[int] = []
        image_rows: list[torch.Tensor] = []
        image_token = self.model.spec.image_token_id
        for seq, count in zip(seqs, counts, strict=True):
            first, end = seq.num_cached, seq.num_cached + count
            while len(seq.pages) * self.page_size < end:
                seq.pages.append(self.free.pop())
            before = sum(1 for t in seq.tokens[:first] if t == image_token)
            for pos in range(first, end):
                if seq.tokens[pos] == image_token and seq.image_rows is not None:
                    image_index.append(len(ids))
                    image_rows.append(seq.image_rows[before])
                    before += 1
                ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(seq.pages[pos // self.page_size] * self.page_size
                             + pos % self.page_size)
            seq.num_cached = end
            starts.append(len(ids))
            lens.append(end)
            tables.append(list(seq.pages))
            lora += [seq.lora_slot] * count
            correction += [seq.correction_slot] * count
        cols = max(width or 0, max(len(t) for t in tables))
        table = torch.tensor([t + [0] * (cols - len(t)) for t in tables], dtype=torch.int32)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            page_table=table.to(device), slot_mapping=torch.tensor(slots, device=device),
            page_size=self.page_size, query_lens_cpu=list(counts), seq_lens_cpu=lens)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=device),
            positions=torch.tensor(positions, device=device), attn=attn,
            logits_indices=torch.tensor(starts[1:], device=device) - 1)
        if image_rows:
            batch.image_embeds = torch.stack(image_rows)
            batch.image_token_indices = torch.tensor(image_index, device=device)
        if self.num_lora_slots and any(s >= 0 for s in lora):
            batch.lora = self._lora(lora)
        if self.num_lora_slots and any(s >= 0 for s in correction):
            batch.lora_correction = self._lora(correction)
        return batch

    def _lora(self, slots: list[int]) -> LoRABatch:
        return prepare_lora_batch(torch.tensor(slots, dtype=torch.int32, device=self.model.device),
                                  self.num_lora_slots, self.lora_backend,
                                  active_slots=sorted({s for s in slots if s >= 0}))  # as the engine

    @torch.inference_mode()
    def logits(self, batch: ForwardBatch, graphs: CudaGraphRunner | None = None,
               piecewise: PiecewiseGraphRunner | None = None) -> torch.Tensor:
        """Logits of ``batch``'s sampled rows: decode steps through ``graphs`` when given,
        other steps (decode steps too, without ``graphs``) through ``piecewise`` when given
        (both must serve the step), else ``model.forward``."""
        if graphs is not None and all(n == 1 for n in batch.attn.query_lens_cpu):
            assert graphs.can_run(batch), "a decode step the graph runner should serve"
            hidden = graphs.run(batch)
        elif piecewise is not None:
            assert piecewise.can_run(batch), "a step the piecewise runner should serve"
            hidden = piecewise.run(batch)
        else:
            hidden = self.model.forward(batch)
        return self.model.compute_logits(hidden.index_select(0, batch.logits_indices))

    def greedy(self, seqs: list[Sequence], steps: int, prefill_chunk: int,
               graphs: CudaGraphRunner | None = None, forced: list[list[int]] | None = None,
               piecewise: PiecewiseGraphRunner | None = None
               ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Prefill every sequence (chunks of ``prefill_chunk``), then ``steps`` greedy decode
        steps of all of them together; returns the tokens and each step's logits (float32).
        ``forced[i][k]`` (teacher forcing) replaces sequence ``i``'s sampled token of step k.
        ``piecewise`` runs the steps ``graphs`` does not (``logits``)."""
        while any(s.num_cached < len(s.tokens) - 1 for s in seqs):
            active = [s for s in seqs if s.num_cached < len(s.tokens) - 1]
            counts = [min(prefill_chunk, len(s.tokens) - 1 - s.num_cached) for s in active]
            self.logits(self.build(active, counts), piecewise=piecewise)
        out: list[list[int]] = [[] for _ in seqs]
        all_logits = []
        for _ in range(steps):
            logits = self.logits(self.build(seqs, [1] * len(seqs)), graphs, piecewise)
            all_logits.append(logits.float().cpu())
            for i, token in enumerate(logits.argmax(-1).tolist()):
                out[i].append(token)
                seqs[i].tokens.append(token if forced is None else forced[i][len(out[i]) - 1])
        return out, all_logits


def fill_slots(model: CausalLMBase, ranks: list[int], seed: int, std: float = 0.2) -> None:
    """Write a random adapter of rank ``ranks[s]`` into slot ``s`` of every LoRA linear (the
    in-place writes the adapter manager does); slots past ``len(ranks)`` are left alone."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for weights, _ in model.lora_slot_map().values():
        if id(weights) in seen:
            continue
        seen.add(id(weights))
        for slot, rank in enumerate(ranks):
            a = torch.randn(weights.lora_a[slot, :, :rank].shape, generator=generator) * std
            b = torch.randn(weights.lora_b[slot, :, :rank].shape, generator=generator) * std
            weights.lora_a[slot].zero_()
            weights.lora_b[slot].zero_()
            weights.lora_a[slot, :, :rank].copy_(a)
            weights.lora_b[slot, :, :rank].copy_(b)
            weights.ranks[slot].fill_(rank)
            weights.scales[slot].fill_(2.0 / max(rank, 1))
            weights.ranks_cpu[slot] = [rank] * len(weights.slice_widths)


def make_lora_model(path: Path, backend: str, device: torch.device, dtype: torch.dtype,
                    ranks: list[int], num_slots: int, max_rank: int, seed: int = 3
                    ) -> CausalLMBase:
    """The checkpoint at ``path`` with ``num_slots`` adapter slots, ``ranks`` filled in."""
    model = load_model(str(path), dtype=dtype, device=device, attention_backend=backend)
    model.init_lora(num_slots, max_rank)
    fill_slots(model, ranks, seed)
    return model
