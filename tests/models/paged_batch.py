"""Test harness: drive a valora model through a paged KV cache one step at a time.

``PagedRunner`` owns the KV cache tensors, hands out pages from a *shuffled* free list (so a
sequence's pages are never contiguous or in order), and turns per-sequence chunks of new tokens
into a ``ForwardBatch`` exactly as the engine lays them out (see ``valora.forward_batch``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.models.base import CausalLMBase
from valora.ops.lora import prepare_lora_batch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm())


class PagePool:
    """Free list of page ids in a seeded random order."""

    def __init__(self, num_pages: int, seed: int) -> None:
        self.free = list(range(num_pages))
        random.Random(seed).shuffle(self.free)

    def take(self) -> int:
        if not self.free:
            raise RuntimeError("test page pool exhausted")
        return self.free.pop()


@dataclass
class SeqState:
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0


@dataclass
class Chunk:
    """New tokens of one sequence for one step.

    ``image_rows``: embedding rows for this chunk's image-placeholder tokens, in order.
    ``lora_slot`` / ``correction_slot``: adapter slot of every token (-1 = none).
    """

    seq: int
    tokens: list[int]
    image_rows: torch.Tensor | None = None
    lora_slot: int = -1
    correction_slot: int = -1


class PagedRunner:
    """Runs ``model`` step by step over a private paged KV cache."""

    def __init__(self, model: CausalLMBase, num_pages: int = 96, page_size: int = 4,
                 seed: int = 0, num_lora_slots: int = 0) -> None:
        self.model = model
        self.page_size = page_size
        shape = model.kv_cache_shape(num_pages, page_size)
        self.caches = [
            (torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
            for _ in range(model.spec.num_layers)]
        model.bind_kv_caches(self.caches)
        self.pool = PagePool(num_pages, seed)
        self.seqs: list[SeqState] = []
        self.num_lora_slots = num_lora_slots

    def add_sequence(self) -> int:
        self.seqs.append(SeqState())
        return len(self.seqs) - 1

    def build(self, chunks: list[Chunk]) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens, tables = [0], [], []
        image_index: list[int] = []
        image_rows: list[torch.Tensor] = []
        lora_slots: list[int] = []
        correction: list[int] = []
        image_token = self.model.spec.image_token_id
        for chunk in chunks:
            state = self.seqs[chunk.seq]
            first = state.num_cached
            end = first + len(chunk.tokens)
            while len(state.pages) * self.page_size < end:
                state.pages.append(self.pool.take())
            for offset, token in enumerate(chunk.tokens):
                pos = first + offset
                if image_token is not None and token == image_token:
                    image_index.append(len(ids))
                ids.append(token)
                positions.append(pos)
                slots.append(state.pages[pos // self.page_size] * self.page_size
                             + pos % self.page_size)
            if chunk.image_rows is not None:
                image_rows.append(chunk.image_rows)
            lora_slots += [chunk.lora_slot] * len(chunk.tokens)
            correction += [chunk.correction_slot] * len(chunk.tokens)
            state.num_cached = end
            starts.append(len(ids))
            seq_lens.append(end)
            tables.append(list(state.pages))
        width = max(len(t) for t in tables)
        page_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), page_table=page_table,
            slot_mapping=torch.tensor(slots, dtype=torch.int64), page_size=self.page_size,
            query_lens_cpu=[len(c.tokens) for c in chunks], seq_lens_cpu=seq_lens)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64), attn=attn,
            logits_indices=torch.tensor(starts[1:], dtype=torch.int64) - 1)
        if image_rows:
            batch.image_embeds = torch.cat(image_rows)
            batch.image_token_indices = torch.tensor(image_index, dtype=torch.int64)
        if self.num_lora_slots:
            if any(s >= 0 for s in lora_slots):
                batch.lora = prepare_lora_batch(torch.tensor(lora_slots), self.num_lora_slots)
            if any(s >= 0 for s in correction):
                batch.lora_correction = prepare_lora_batch(torch.tensor(correction),
                                                           self.num_lora_slots)
        return batch

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """One step; returns each chunk's logits for every one of its tokens ``[n, vocab]``."""
        batch = self.build(chunks)
        logits = self.model.compute_logits(self.model.forward(batch))
        sizes = batch.attn.query_lens_cpu
        return list(logits.split(sizes))


def image_rows_for(tokens: list[int], image_token_id: int, rows: torch.Tensor,
                   start: int, end: int) -> torch.Tensor | None:
    """Rows of ``rows`` (one per image token of the prompt ``tokens``) inside ``[start, end)``."""
    before = sum(1 for t in tokens[:start] if t == image_token_id)
    inside = sum(1 for t in tokens[start:end] if t == image_token_id)
    return rows[before:before + inside] if inside else None
