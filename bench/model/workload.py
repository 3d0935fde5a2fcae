"""valora side of the model benchmark: random adapters in slots, a paged KV pool, step batches.

Decode steps: ``B`` sequences of context ``600 ± 10`` (576 image tokens + prompt) on pages drawn
from a shuffled pool (never page 0), each decoding its next token. Adapter slots hold random
adapters of ranks ``SLOT_RANKS[s % 4]`` on all seven projections; a *scenario* says which slot
each sequence uses. Floors count the bytes a step must move: decoder weights + LM head, the KV of
every context, and the true-rank bytes of each distinct adapter in the step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.models.base import CausalLMBase
from valora.ops.lora import prepare_lora_batch

SLOT_RANKS = (8, 16, 32, 64)
PAGE_SIZE = 16
SCENARIOS = ("base", "one_adapter_r16", "mixed8_r16", "mixed32_ranks")
MERGED = "merged_r16"
"""The merged-adapter scenario: slot ``MERGED_SLOT``'s rank-16 adapter (``one_adapter_r16``'s)
folded into the weights, every row on the base path (``bench_decode.py``)."""
MERGED_SLOT = 1


def fill_adapter_slots(model: CausalLMBase, num_slots: int, seed: int) -> list[int]:
    """Random A/B in every slot (std 0.02), ranks ``SLOT_RANKS[s % 4]``; returns the ranks."""
    ranks = [SLOT_RANKS[s % len(SLOT_RANKS)] for s in range(num_slots)]
    generator = torch.Generator(device=model.device).manual_seed(seed)
    seen: set[int] = set()
    for weights, _ in model.lora_slot_map().values():
        if id(weights) in seen:
            continue
        seen.add(id(weights))
        weights.lora_a.normal_(0.0, 0.02, generator=generator)
        weights.lora_b.normal_(0.0, 0.02, generator=generator)
        for slot, rank in enumerate(ranks):
            weights.ranks[slot].fill_(rank)
            weights.scales[slot].fill_(2.0)
            weights.ranks_cpu[slot] = [rank] * len(weights.slice_widths)
    return ranks


def scenario_slots(scenario: str, batch: int) -> list[int]:
    """Slot of each of ``batch`` sequences (-1: base model)."""
    if scenario in ("base", MERGED):
        return [-1] * batch
    if scenario == "one_adapter_r16":
        return [1] * batch
    if scenario == "mixed8_r16":
        return [1 + 4 * (i % 8) for i in range(batch)]  # slots 1, 5, ..., 29: all rank 16
    if scenario == "mixed32_ranks":
        return [i % 32 for i in range(batch)]
    raise ValueError(f"unknown scenario {scenario!r}")


class KVPool:
    """KV caches for ``num_pages`` pages of every layer, random bf16 contents, page 0 null."""

    def __init__(self, model: CausalLMBase, num_pages: int, seed: int) -> None:
        shape = model.kv_cache_shape(num_pages, PAGE_SIZE)
        generator = torch.Generator(device=model.device).manual_seed(seed)
        self.caches = []
        for _ in range(model.spec.num_layers):
            k = torch.empty(shape, dtype=model.dtype, device=model.device)
            v = torch.empty_like(k)
            k.normal_(0.0, 1.0, generator=generator)
            v.normal_(0.0, 1.0, generator=generator)
            self.caches.append((k, v))
        model.bind_kv_caches(self.caches)
        self.num_pages, self.seed = num_pages, seed
        self.free: list[int] = []
        self.reset()

    def reset(self) -> None:
        """Every page free again (contents stay: random, which is all a timing needs)."""
        self.free = list(range(1, self.num_pages))
        random.Random(self.seed).shuffle(self.free)

    def take(self, count: int) -> list[int]:
        pages, self.free = self.free[:count], self.free[count:]
        if len(pages) < count:
            raise RuntimeError("benchmark KV pool exhausted")
        return pages


@dataclass
class StepSetup:
    batch: ForwardBatch
    context_tokens: int
    slots: list[int]


def decode_step(model: CausalLMBase, pool: KVPool, contexts: list[int], slots: list[int],
                num_slots: int, lora_backend: str) -> StepSetup:
    """One decode step: sequence ``i`` has ``contexts[i]`` tokens after this step."""
    device = model.device
    tables = [pool.take(-(-n // PAGE_SIZE)) for n in contexts]
    width = max(len(t) for t in tables)
    slot_mapping = [t[(n - 1) // PAGE_SIZE] * PAGE_SIZE + (n - 1) % PAGE_SIZE
                    for t, n in zip(tables, contexts, strict=True)]
    count = len(contexts)
    attn = AttentionMetadata(
        query_start_loc=torch.arange(count + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(contexts, dtype=torch.int32, device=device),
        page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                device=device),
        slot_mapping=torch.tensor(slot_mapping, device=device), page_size=PAGE_SIZE,
        query_lens_cpu=[1] * count, seq_lens_cpu=list(contexts))
    generator = torch.Generator().manual_seed(count)
    ids = torch.randint(0, model.spec.vocab_size - 100, (count,), generator=generator)
    batch = ForwardBatch(input_ids=ids.to(device),
                         positions=torch.tensor([n - 1 for n in contexts], device=device),
                         attn=attn, logits_indices=torch.arange(count, device=device))
    if any(s >= 0 for s in slots):
        batch.lora = prepare_lora_batch(torch.tensor(slots, dtype=torch.int32, device=device),
                                        num_slots, lora_backend,
                                        active_slots=sorted({s for s in slots if s >= 0}))
        # the host knows the step's adapters, as in the engine (tile hints, few-adapter graphs)
    return StepSetup(batch, sum(contexts), slots)


def prefill_step(model: CausalLMBase, pool: KVPool, prompts: int, prompt_len: int,
                 image_rows: torch.Tensor) -> ForwardBatch:
    """``prompts`` fresh image prompts of ``prompt_len`` tokens; the first ``image_rows.shape[1]``
    tokens of each take the rows ``image_rows[i]`` (as the engine places image embeddings)."""
    device = model.device
    num_image = int(image_rows.shape[1])
    tables = [pool.take(-(-prompt_len // PAGE_SIZE)) for _ in range(prompts)]
    slots = [t[j // PAGE_SIZE] * PAGE_SIZE + j % PAGE_SIZE for t in tables
             for j in range(prompt_len)]
    starts = [i * prompt_len for i in range(prompts + 1)]
    attn = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((prompts,), prompt_len, dtype=torch.int32, device=device),
        page_table=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, device=device), page_size=PAGE_SIZE,
        query_lens_cpu=[prompt_len] * prompts, seq_lens_cpu=[prompt_len] * prompts)
    ids = torch.randint(0, model.spec.vocab_size - 100, (prompts * prompt_len,))
    image_index = torch.cat([torch.arange(num_image) + i * prompt_len for i in range(prompts)])
    return ForwardBatch(
        input_ids=ids.to(device), positions=torch.arange(prompt_len).repeat(prompts).to(device),
        attn=attn, logits_indices=torch.tensor(starts[1:], device=device) - 1,
        image_embeds=image_rows.reshape(-1, image_rows.shape[-1]),
        image_token_indices=image_index.to(device))


def decoder_bytes(model: CausalLMBase) -> int:
    """Bytes a decode step reads from the weights: the decoder without its embedding table
    (a few rows are gathered) plus the LM head."""
    decoder = model.decoder
    skip = {id(decoder.embed_tokens.weight)}
    total = sum(p.numel() * p.element_size() for p in decoder.parameters() if id(p) not in skip)
    head = model.lm_head.projection_weight()
    return total + head.numel() * head.element_size()


def adapter_bytes(model: CausalLMBase, ranks: list[int], slots: list[int]) -> int:
    """True-rank bytes of the distinct adapters among ``slots`` (all seven projections)."""
    spec, element = model.spec, torch.tensor([], dtype=model.dtype).element_size()
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_rank = ((hidden + q_out) + 2 * (hidden + kv_out) + (q_out + hidden)
                + 2 * (hidden + inter) + (inter + hidden))
    distinct = {s for s in slots if s >= 0}
    return sum(ranks[s] for s in distinct) * per_rank * spec.num_layers * element


def kv_bytes(model: CausalLMBase, context_tokens: int) -> int:
    spec, element = model.spec, torch.tensor([], dtype=model.dtype).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element * context_tokens
