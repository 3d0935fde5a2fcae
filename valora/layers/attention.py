"""Paged causal attention: one interface, backends chosen by name when the model is built.

KV cache of one layer: a pair ``(k_cache, v_cache)``, each ``[num_pages, page_size, KV, D]``.
Token ``j`` of a sequence lives at page ``page_table[seq, j // page_size]``, offset
``j % page_size`` (flat slot ``page * page_size + offset``).

Semantics of ``backend.forward(query, key, value, kv_cache, attn, plan, scale)`` with ``query
[T, H, D]``, ``key``/``value [T, KV, D]`` (RoPE already applied) and ``H % KV == 0``::

    k_cache.flat[attn.slot_mapping] = key;  v_cache.flat[attn.slot_mapping] = value
    for each sequence i with new tokens t = query_start_loc[i] .. query_start_loc[i+1]-1:
        L = seq_lens[i]; n = number of new tokens; K, V = its first L cached tokens
        token t (context index c = L - n + (t - query_start_loc[i])) attends to K[:c+1]:
        out[t, h] = softmax(scale * query[t, h] · K[:c+1, h // (H/KV)]) @ V[:c+1, h // (H/KV)]

``out`` (optional, ``query``'s shape and dtype, contiguous) receives the result instead of a new
tensor. ``backend.plan(attn)`` runs once per forward pass and returns whatever the backend precomputes
from the metadata (shared by every layer); layers pass it back untouched.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

import torch

from valora.errors import ValoraError
from valora.forward_batch import AttentionMetadata
from valora.layers.fused_select import fused_kv_write, usable

KVCache = tuple[torch.Tensor, torch.Tensor]


class AttentionBackend(Protocol):
    """A paged-attention implementation (see module docstring for the semantics)."""

    name: str

    def plan(self, attn: AttentionMetadata) -> object:
        """Precompute per-step data from ``attn`` (called once per forward pass)."""
        ...

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
        """Write this step's K/V into ``kv_cache`` and return the attention output ``[T, H, D]``
        (written into ``out`` when given: ``query``'s shape and dtype, contiguous)."""
        ...


AttentionBackendFactory = Callable[[], AttentionBackend]

_BACKENDS: dict[str, AttentionBackendFactory] = {}


def register_attention_backend(name: str, factory: AttentionBackendFactory) -> None:
    """Make ``factory`` available as ``create_attention_backend(name)``."""
    _BACKENDS[name] = factory


def _triton_backend() -> AttentionBackend:
    from valora.layers.attention_triton import TritonPagedAttention

    return TritonPagedAttention()


def _ensure_builtin_backends() -> None:
    if "torch" not in _BACKENDS:
        from valora.layers.attention_torch import TorchPagedAttention

        register_attention_backend("torch", TorchPagedAttention)
    if "triton" not in _BACKENDS and importlib.util.find_spec("triton") is not None:
        register_attention_backend("triton", _triton_backend)  # imported on first use


def available_attention_backends() -> list[str]:
    _ensure_builtin_backends()
    return sorted(_BACKENDS)


def create_attention_backend(name: str) -> AttentionBackend:
    """A fresh backend instance registered under ``name``."""
    _ensure_builtin_backends()
    if name not in _BACKENDS:
        raise ValoraError(
            f"unknown attention backend {name!r}; available: {available_attention_backends()}"
        )
    return _BACKENDS[name]()


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor
) -> None:
    """Store ``key``/``value [T, KV, D]`` at flat slots ``slot_mapping [T]`` of the paged cache:
    one Triton launch for both when ``fused_select.fused_kv_write()`` is on and the kernels can
    take the tensors, else two ``index_copy_``."""
    k_cache, v_cache = kv_cache
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if fused_kv_write() and _kv_kernel_fits(key, value, k_cache, v_cache):
        from valora.layers import fused_kernels

        width = num_kv_heads * head_dim
        fused_kernels.write_kv(key, value, k_cache.view(-1, width), v_cache.view(-1, width),
                               slot_mapping)
        return
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _kv_kernel_fits(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor) -> bool:
    """``usable`` for the inputs, caches of a kernel dtype and contiguous, rows of ``KV·D``
    contiguous elements in ``key`` and ``value``."""
    heads, dim = key.shape[1], key.shape[2]
    return (usable(key, value) and k_cache.device == key.device
            and all(c.is_contiguous() and c.dtype in (torch.float32, torch.float16,
                                                       torch.bfloat16) for c in (k_cache, v_cache))
            and all(t.stride(2) == 1 and t.stride(1) == dim and t.shape[1:] == (heads, dim)
                    for t in (key, value)))


def output_buffer(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked against ``query`` (shape, dtype, device, contiguous), or a new tensor."""
    if out is None:
        return torch.empty_like(query)
    if (out.shape != query.shape or out.dtype != query.dtype or out.device != query.device
            or not out.is_contiguous()):
        raise ValoraError(f"attention out {tuple(out.shape)} {out.dtype} on {out.device} must be "
                          f"contiguous {tuple(query.shape)} {query.dtype} on {query.device}")
    return out

