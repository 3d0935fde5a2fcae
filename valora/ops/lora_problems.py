"""Synthetic batched-LoRA problems: slot weights of given ranks and token→slot maps by popularity.

Shared by the op tests, the tile tuner and the operator benchmark, so all three exercise the same
distributions. Popularity of ``n`` adapters over ``T`` tokens (token order is shuffled):

- ``distinct``: token ``t`` uses adapter ``t mod n`` (every token its own adapter when T ≤ n);
- ``uniform``: adapters drawn uniformly at random;
- ``zipf``: adapter ``i`` drawn with probability ∝ 1 / (i + 1);
- ``identical``: every token uses adapter 0;
- ``one_hot``: 70 % of tokens use adapter 0, the rest uniform over the others.

``none_fraction`` of the tokens get slot -1 (no adapter). Values are random normal, scaled so
that ``(x·Aᵀ)·Bᵀ`` stays O(1) whatever the widths: never zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from valora.errors import ValoraError
from valora.ops.lora import LoRASlotWeights, b_storage, lora_b_layout

POPULARITIES: tuple[str, ...] = ("distinct", "uniform", "zipf", "identical", "one_hot")
HOT_SHARE = 0.7
POISON = 1e3


def make_token_slots(num_tokens: int, num_adapters: int, popularity: str,
                     generator: torch.Generator, none_fraction: float = 0.0) -> torch.Tensor:
    """``[num_tokens]`` int32 CPU tensor of slots in ``[-1, num_adapters)``."""
    if popularity not in POPULARITIES:
        raise ValoraError(f"unknown popularity {popularity!r}; choose from {POPULARITIES}")
    if num_adapters < 1:
        raise ValoraError("num_adapters must be >= 1")
    if popularity == "distinct":
        slots = torch.arange(num_tokens) % num_adapters
    elif popularity == "uniform":
        slots = torch.randint(0, num_adapters, (num_tokens,), generator=generator)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64)
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=generator)
    elif popularity == "identical":
        slots = torch.zeros(num_tokens, dtype=torch.int64)
    else:
        hot = torch.rand(num_tokens, generator=generator) < HOT_SHARE
        others = torch.randint(1, max(num_adapters, 2), (num_tokens,), generator=generator)
        slots = torch.where(hot | (num_adapters == 1), torch.zeros_like(others), others)
    slots = slots[torch.randperm(num_tokens, generator=generator)]
    if none_fraction > 0:
        drop = torch.rand(num_tokens, generator=generator) < none_fraction
        slots = torch.where(drop, torch.full_like(slots, -1), slots)
    return slots.to(torch.int32)


def make_slot_weights(slot_ranks: Sequence[int | Sequence[int]], in_features: int,
                      slice_widths: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                      seed: int, max_rank: int | None = None,
                      b_layout: str | None = None) -> LoRASlotWeights:
    """Slot storage with random weights drawn on ``device``; ``slot_ranks[s]`` is one rank for
    every slice, or one rank per slice (0 = slice not targeted). Storage rank: ``max_rank`` or
    the largest rank. Storage above each rank holds 1e3 (poison: computing on it shows; the
    expand may load ``B``'s padding in a rank-tail chunk, against zeros of ``h``). ``lora_b`` is
    stored in ``b_layout`` (default ``lora_b_layout()``); the values do not depend on it."""
    per_slice = [[int(r)] * len(slice_widths) if isinstance(r, int) else [int(v) for v in r]
                 for r in slot_ranks]
    storage = max(max_rank if max_rank is not None else max(max(r) for r in per_slice), 1)
    num_slots, num_slices = len(per_slice), len(slice_widths)
    generator = torch.Generator(device=device).manual_seed(seed)
    a_shape = (num_slots, num_slices, storage, in_features)
    b_shape = (num_slots, sum(slice_widths), storage)
    lora_a = torch.randn(a_shape, generator=generator, device=device) / math.sqrt(in_features)
    lora_b = torch.randn(b_shape, generator=generator, device=device) / math.sqrt(storage)
    ranks = torch.tensor(per_slice, dtype=torch.int32, device=device)
    rho = torch.arange(storage, device=device)
    lora_a.masked_fill_(rho.view(1, 1, storage, 1) >= ranks.view(num_slots, num_slices, 1, 1),
                        POISON)
    col_slice = torch.repeat_interleave(torch.arange(num_slices, device=device),
                                        torch.tensor(list(slice_widths), device=device))
    lora_b.masked_fill_(rho.view(1, 1, storage) >= ranks[:, col_slice].unsqueeze(-1), POISON)
    scales = 0.5 + torch.rand(num_slots, num_slices, generator=generator, device=device)
    layout = lora_b_layout() if b_layout is None else b_layout
    return LoRASlotWeights(lora_a=lora_a.to(dtype), lora_b=b_storage(lora_b.to(dtype), layout),
                           ranks=ranks, scales=scales, slice_widths=tuple(slice_widths),
                           ranks_cpu=per_slice)


def zero_padding(weights: LoRASlotWeights) -> LoRASlotWeights:
    """A copy whose storage above each rank is zero (what a loader writes; for padded peers)."""
    num_slots, num_slices, storage, _ = weights.lora_a.shape
    ranks = weights.ranks.to(torch.int64)
    rho = torch.arange(storage, device=weights.lora_a.device)
    a_pad = rho.view(1, 1, storage, 1) >= ranks.view(num_slots, num_slices, 1, 1)
    a = weights.lora_a.masked_fill(a_pad, 0)
    col_slice = torch.repeat_interleave(torch.arange(num_slices, device=rho.device),
                                        torch.tensor(list(weights.slice_widths), device=rho.device))
    b = weights.lora_b.masked_fill(rho.view(1, 1, storage) >= ranks[:, col_slice].unsqueeze(-1), 0)
    return LoRASlotWeights(a, b, weights.ranks, weights.scales, weights.slice_widths,
                           [list(r) for r in weights.ranks_cpu])
