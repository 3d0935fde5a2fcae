"""The ``"triton"`` paged-attention backend: launchers around ``attention_triton_kernels``.

Same semantics as ``valora.layers.attention`` (the ``"torch"`` backend is its reference twin).
``plan`` sorts the step's sequences once for all layers: decodes (one new token) go to the
flash-decoding kernel, which handles all query heads of one KV head in one program and splits
long contexts over several programs (``num_splits``) when the decodes alone would not fill the
GPU; every multi-token sequence (prefill chunk, prefix hit) goes to the prefill kernel in tiles
of ``BLOCK_M`` new tokens. New K/V are written with ``index_copy_`` before the kernels read.

Host synchronisation: none in ``forward``. ``plan`` reads only the host copies
(``query_lens_cpu``, ``seq_lens_cpu``); when every sequence is a decode it builds no device
tensor from host data, so a CUDA graph can capture ``plan`` + ``forward`` over static metadata.
The split count then follows from the ``seq_lens_cpu`` seen at capture (set it to the longest
context the graph must serve); programs past a sequence's real length return at once.
On the CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from valora.errors import ValoraError
from valora.forward_batch import AttentionMetadata
from valora.layers.attention import (
    KVCache,
    output_buffer,
    register_attention_backend,
    write_kv_cache,
)
from valora.layers.attention_triton_kernels import (
    paged_decode_kernel,
    paged_decode_reduce_kernel,
    paged_prefill_kernel,
)
from valora.ops.launch import launcher

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634
MAX_SPLITS = 64


def kernels_interpreted() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return type(paged_decode_kernel).__name__ == "InterpretedFunction"


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_splits(num_decodes: int, num_kv_heads: int, max_len: int, block_n: int,
                  target_programs: int, max_split_len: int = 512) -> tuple[int, int]:
    """``(num_splits, split_len)``: split contexts until ≈ ``target_programs`` programs run.

    ``split_len`` is a multiple of ``block_n``, at most ``max_split_len`` when splitting (so a
    graph planned for a long ``max_len`` still spreads a short context over several programs)
    unless that needs more than ``MAX_SPLITS`` splits, and ``num_splits · split_len >= max_len``.
    """
    programs = max(1, num_decodes * num_kv_heads)
    max_blocks = max(1, _cdiv(max_len, block_n))
    if programs >= target_programs or max_blocks == 1:
        return 1, max_blocks * block_n
    splits = min(_cdiv(target_programs, programs), max_blocks)
    blocks = min(_cdiv(max_blocks, splits), max(1, max_split_len // block_n))
    blocks = max(blocks, _cdiv(max_blocks, MAX_SPLITS))
    return _cdiv(max_blocks, blocks), blocks * block_n


@dataclass
class TritonAttentionPlan:
    """Per-step launch data shared by all layers (built by ``TritonPagedAttention.plan``).

    ``decode_seqs``: sequence index of each decode (``None``: every sequence is a decode, in
    order). ``prefill_tiles``: ``[num_tiles, 2]`` int32 ``(sequence, first new token)``.
    ``part_acc``/``part_ml``: split-K scratch (``None`` when ``num_splits == 1``).
    """

    num_decodes: int
    decode_seqs: torch.Tensor | None
    num_splits: int
    split_len: int
    prefill_tiles: torch.Tensor | None
    num_prefill_tiles: int
    part_acc: torch.Tensor | None = None
    part_ml: torch.Tensor | None = None


class TritonPagedAttention:
    """Paged attention as Triton kernels (see the module docstring)."""

    name = "triton"
    graph_capturable = True
    """``plan`` + ``forward`` of an all-decode step may be captured in a CUDA graph."""

    def __init__(self, decode_block_n: int = 64, prefill_block_m: int = 64,
                 prefill_block_n: int = 64, programs_per_sm: int = 4,
                 decode_num_warps: int = 4, decode_num_stages: int = 2) -> None:
        self.decode_block_n = decode_block_n
        self.prefill_block_m = prefill_block_m
        self.prefill_block_n = prefill_block_n
        self.programs_per_sm = programs_per_sm
        self.decode_num_warps = decode_num_warps
        self.decode_num_stages = decode_num_stages
        self.num_heads = 0
        self.num_kv_heads = 0
        self.head_dim = 0

    def configure(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Tell ``plan`` the head geometry: it sizes the split count by ``num_kv_heads`` and
        allocates split-K scratch once per step. Optional: the first ``forward`` records it
        (a plan made before that splits as if there were one KV head, still correct)."""
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def plan(self, attn: AttentionMetadata) -> TritonAttentionPlan:
        device = attn.page_table.device
        query_lens = attn.query_lens_cpu
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        chunks = [i for i, n in enumerate(query_lens) if n > 1]
        decode_seqs = None
        if decodes and len(decodes) != len(query_lens):
            decode_seqs = torch.tensor(decodes, dtype=torch.int32, device=device)
        max_len = max((attn.seq_lens_cpu[i] for i in decodes), default=0)
        kv_heads = self.num_kv_heads or 1
        num_splits, split_len = choose_splits(
            len(decodes), kv_heads, max_len, self.decode_block_n,
            self.programs_per_sm * _num_sms(device))
        tiles = [(i, q0) for i in chunks for q0 in range(0, query_lens[i], self.prefill_block_m)]
        plan = TritonAttentionPlan(
            num_decodes=len(decodes), decode_seqs=decode_seqs, num_splits=num_splits,
            split_len=split_len,
            prefill_tiles=torch.tensor(tiles, dtype=torch.int32, device=device) if tiles else None,
            num_prefill_tiles=len(tiles))
        if decodes and num_splits > 1 and self.num_heads:
            self._allocate_scratch(plan, self.num_heads, self.head_dim, device)
        return plan

    def _allocate_scratch(self, plan: TritonAttentionPlan, num_heads: int, head_dim: int,
                          device: torch.device) -> None:
        block_d = _block_d(head_dim)
        plan.part_acc = torch.empty(plan.num_decodes, num_heads, plan.num_splits, block_d,
                                    dtype=torch.float32, device=device)
        plan.part_ml = torch.empty(plan.num_decodes, num_heads, plan.num_splits, 2,
                                   dtype=torch.float32, device=device)

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
        if not isinstance(plan, TritonAttentionPlan):
            raise ValoraError("triton attention: plan was not built by TritonPagedAttention.plan")
        _check(query, key, value, kv_cache)
        if not self.num_heads:  # learn the geometry once; later plans size splits by it
            self.configure(query.shape[1], kv_cache[0].shape[2], query.shape[2])
        write_kv_cache(key, value, kv_cache, attn.slot_mapping)
        if query.stride(2) != 1:
            query = query.contiguous()
        out = output_buffer(query, out)
        if plan.num_decodes:
            self._decode(query, kv_cache, attn, plan, scale, out)
        if plan.num_prefill_tiles:
            self._prefill(query, kv_cache, attn, plan, scale, out)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: KVCache, attn: AttentionMetadata,
                plan: TritonAttentionPlan, scale: float, out: torch.Tensor) -> None:
        k_cache, v_cache = kv_cache
        _, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        block_d = _block_d(head_dim)
        single = plan.num_splits == 1
        if not single and plan.part_acc is None:
            self._allocate_scratch(plan, num_heads, head_dim, query.device)
        assert single or (plan.part_acc is not None and plan.part_ml is not None)
        part_acc = out if single else plan.part_acc
        part_ml = out if single else plan.part_ml
        seqs = plan.decode_seqs if plan.decode_seqs is not None else attn.seq_lens
        identity = plan.decode_seqs is None
        grid = (plan.num_decodes, num_kv_heads, plan.num_splits)
        launcher(paged_decode_kernel)[grid](
            query, k_cache, v_cache, out, part_acc, part_ml,
            attn.seq_lens, attn.page_table, attn.query_start_loc, seqs,
            scale * LOG2_E, plan.num_splits, plan.split_len, num_heads,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            attn.page_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, PAGE_SIZE=attn.page_size, HEAD_DIM=head_dim,
            BLOCK_Q=max(16, triton_next_pow2(group)), BLOCK_N=self.decode_block_n,
            BLOCK_D=block_d, IDENTITY_SEQS=identity, SINGLE_SPLIT=single,
            **_dot_flags(query.dtype), num_warps=self.decode_num_warps,
            num_stages=self.decode_num_stages)
        if not single:
            launcher(paged_decode_reduce_kernel)[(plan.num_decodes, num_heads)](
                out, part_acc, part_ml, attn.seq_lens, attn.query_start_loc, seqs,
                plan.num_splits, plan.split_len, num_heads, out.stride(0), out.stride(1),
                HEAD_DIM=head_dim, BLOCK_D=block_d,
                BLOCK_S=max(2, triton_next_pow2(plan.num_splits)), IDENTITY_SEQS=identity)

    def _prefill(self, query: torch.Tensor, kv_cache: KVCache, attn: AttentionMetadata,
                 plan: TritonAttentionPlan, scale: float, out: torch.Tensor) -> None:
        k_cache, v_cache = kv_cache
        _, num_heads, head_dim = query.shape
        grid = (plan.num_prefill_tiles, num_heads)
        launcher(paged_prefill_kernel)[grid](
            query, k_cache, v_cache, out, plan.prefill_tiles,
            attn.seq_lens, attn.page_table, attn.query_start_loc, scale * LOG2_E,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            attn.page_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=num_heads // k_cache.shape[2], PAGE_SIZE=attn.page_size, HEAD_DIM=head_dim,
            BLOCK_M=self.prefill_block_m, BLOCK_N=self.prefill_block_n,
            BLOCK_D=_block_d(head_dim), **_dot_flags(query.dtype),
            num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def triton_next_pow2(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


def _block_d(head_dim: int) -> int:
    return max(16, triton_next_pow2(head_dim))


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """fp32 multiplies exactly (no tf32); the interpreter multiplies bf16 blocks in fp32."""
    upcast = dtype == torch.bfloat16 and kernels_interpreted()
    return {"PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32",
            "UPCAST": upcast}


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           kv_cache: KVCache) -> None:
    k_cache, v_cache = kv_cache
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValoraError(f"triton attention: dtype {query.dtype} not supported")
    if k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise ValoraError(f"triton attention: cache {k_cache.dtype} but query {query.dtype}")
    if query.dim() != 3 or key.shape != value.shape or key.shape[0] != query.shape[0]:
        raise ValoraError(f"triton attention: query {tuple(query.shape)}, key "
                          f"{tuple(key.shape)}, value {tuple(value.shape)} disagree")
    if query.shape[1] % k_cache.shape[2] or query.shape[2] != k_cache.shape[3]:
        raise ValoraError(f"triton attention: {query.shape[1]} heads of {query.shape[2]} over "
                          f"cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValoraError("triton attention: KV caches must be contiguous")
    if query.device.type != "cuda" and not kernels_interpreted():
        raise ValoraError("triton attention runs on CUDA tensors (or the CPU under "
                          "TRITON_INTERPRET=1)")


register_attention_backend("triton", TritonPagedAttention)
