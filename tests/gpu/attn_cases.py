"""Random paged-attention problems and the fp32 reference answer (the ``"torch"`` backend).

``make_case(query_lens, cached_lens, ...)`` lays sequence ``i`` out with ``cached_lens[i]``
tokens already in the cache and ``query_lens[i]`` new ones, on pages drawn from a shuffled pool
(never page 0), with random K/V everywhere else in the cache so stray reads show.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from valora.forward_batch import AttentionMetadata
from valora.layers.attention import KVCache
from valora.layers.attention_torch import TorchPagedAttention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class AttentionCase:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cache: KVCache
    attn: AttentionMetadata
    scale: float


def make_case(query_lens: list[int], cached_lens: list[int], *, num_heads: int = 4,
              num_kv_heads: int = 2, head_dim: int = 16, page_size: int = 4,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              seed: int = 0) -> AttentionCase:
    generator = torch.Generator().manual_seed(seed)
    needed = sum(-(-(n + c) // page_size) for n, c in zip(query_lens, cached_lens, strict=True))
    num_pages = needed + 3
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    cache = (torch.randn(shape, generator=generator).to(device, dtype),
             torch.randn(shape, generator=generator).to(device, dtype))
    pool = list(range(1, num_pages))
    random.Random(seed).shuffle(pool)
    starts, lens, tables, slots = [0], [], [], []
    for new, cached in zip(query_lens, cached_lens, strict=True):
        length = new + cached
        pages = [pool.pop() for _ in range(-(-length // page_size))]
        tables.append(pages)
        slots += [pages[p // page_size] * page_size + p % page_size for p in range(cached, length)]
        starts.append(starts[-1] + new)
        lens.append(length)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    attn = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        page_table=table.to(device), slot_mapping=torch.tensor(slots, device=device),
        page_size=page_size, query_lens_cpu=list(query_lens), seq_lens_cpu=lens)
    tokens = starts[-1]

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(tokens, heads, head_dim, generator=generator).to(device, dtype)

    return AttentionCase(rand(num_heads), rand(num_kv_heads), rand(num_kv_heads), cache, attn,
                         head_dim ** -0.5)


def reference(case: AttentionCase) -> tuple[torch.Tensor, KVCache]:
    """The torch backend on float32 copies: ``(output, cache after the write)``."""
    cache = (case.cache[0].float().clone(), case.cache[1].float().clone())
    backend = TorchPagedAttention()
    out = backend.forward(case.query.float(), case.key.float(), case.value.float(), cache,
                          case.attn, backend.plan(case.attn), case.scale)
    return out, cache


def run_backend(backend: object, case: AttentionCase) -> tuple[torch.Tensor, KVCache]:
    """``backend`` on copies of the case's cache: ``(output, cache after the write)``."""
    cache = (case.cache[0].clone(), case.cache[1].clone())
    plan = backend.plan(case.attn)  # type: ignore[attr-defined]
    out = backend.forward(case.query, case.key, case.value, cache,  # type: ignore[attr-defined]
                          case.attn, plan, case.scale)
    return out, cache


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a64 - b64).norm() / b64.norm())
