"""Triton kernels of the ``"triton"`` paged-attention backend (launchers in ``attention_triton``).

Cache layout: ``k_cache``/``v_cache [num_pages, page_size, KV, D]``; token ``j`` of sequence
``b`` sits at page ``page_table[b, j // page_size]``, offset ``j % page_size``. ``GROUP = H / KV``
query heads share one KV head. Scores use base-2 exponentials (``scale_log2 = scale · log2 e``)
and fp32 accumulation; ``P`` is rounded to the value dtype before ``P · V`` (as flash attention).

Semantics of the decode kernel, program ``(i, g, split)`` over decode sequence ``b = seqs[i]``
(``seqs[i] = i`` when ``IDENTITY_SEQS``), its token row ``t = query_start_loc[b]``, length
``L = seq_lens[b]`` and key range ``[split · split_len, min(L, (split + 1) · split_len))``::

    for every query head h of KV head g (GROUP heads at once, rows padded to BLOCK_Q):
        s = scale · q[t, h] · K[range, g]ᵀ
        SINGLE_SPLIT: out[t, h] = softmax(s) @ V[range, g]
        else:         part_acc[i, h, split] = Σ exp(s - m) V,  part_m = m,  part_l = Σ exp(s - m)

A split whose range is empty stores ``m = -inf, l = 0``; a sequence with ``L = 0`` (padding
rows of a CUDA-graph bucket) gets a zero output. The reduce kernel combines the splits of one
(sequence, head): ``out = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s`` with ``M = max_s m_s``.

Semantics of the prefill kernel, program ``(tile, h)``: tile ``= (b, q0)`` covers new tokens
``q0 .. q0 + BLOCK_M - 1`` of sequence ``b`` (``n`` new tokens, ``L`` after this step); new token
``q`` has context index ``c = L - n + q`` and attends keys ``0 .. c`` of KV head ``h // GROUP``.

``UPCAST`` (interpreter only) multiplies in fp32 after the same rounding: Triton's CPU
interpreter cannot multiply bf16 blocks.
"""

from __future__ import annotations

# mypy: disable-error-code="no-untyped-def"
import triton
import triton.language as tl


@triton.jit
def _page_offsets(page_table_ptr, seq, offs_n, n_ok, stride_pt, stride_kp, stride_ks,
                  kv_off, PAGE_SIZE: tl.constexpr):
    """Element offsets of tokens ``offs_n`` of sequence ``seq`` (KV head already in ``kv_off``)."""
    page = tl.load(page_table_ptr + seq * stride_pt + offs_n // PAGE_SIZE, mask=n_ok, other=0)
    return page.to(tl.int64) * stride_kp + (offs_n % PAGE_SIZE) * stride_ks + kv_off


@triton.jit
def _attend_block(q, k, v, s_mask, m_i, l_i, acc, scale_log2,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over a key block; returns the updated ``(m, l, acc)``."""
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    s = tl.where(s_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows with no valid key yet keep m = -inf; shift by 0 so exp2 never sees (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_splits", "split_len", "stride_pt"])
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    seq_lens_ptr, page_table_ptr, query_start_ptr, seqs_ptr,
    scale_log2, num_splits, split_len, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_pt, stride_kp, stride_ks, stride_kh,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IDENTITY_SEQS: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    index = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = index if IDENTITY_SEQS else tl.load(seqs_ptr + index)
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(query_start_ptr + seq).to(tl.int64)
    start = split * split_len
    end = tl.minimum(seq_len, start + split_len)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_q
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    kv_off = kv_head * stride_kh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        offsets = _page_offsets(page_table_ptr, seq, offs_n, n_ok, stride_pt, stride_kp,
                                stride_ks, kv_off, PAGE_SIZE)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + offsets[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend_block(q, k, v, n_ok[None, :], m_i, l_i, acc, scale_log2,
                                      PRECISION, UPCAST)
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    else:
        # part_acc [I, H, S, BLOCK_D] and part_ml [I, H, S, 2] (m, l), all fp32.
        part = (index * num_heads + heads).to(tl.int64) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc,
                 mask=q_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=q_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=q_ok)


@triton.jit(do_not_specialize=["num_splits", "split_len"])
def paged_decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, seq_lens_ptr, query_start_ptr, seqs_ptr,
    num_splits, split_len, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    IDENTITY_SEQS: tl.constexpr,
):
    index = tl.program_id(0)
    head = tl.program_id(1)
    seq = index if IDENTITY_SEQS else tl.load(seqs_ptr + index)
    seq_len = tl.load(seq_lens_ptr + seq)
    row = tl.load(query_start_ptr + seq).to(tl.int64)
    num_valid = tl.cdiv(seq_len, split_len)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_valid
    part = (index * num_heads + head).to(tl.int64) * num_splits + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.where(s_ok, tl.exp2(m - m_max), 0.0)
    total = tl.sum(weight * l_s, axis=0)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["stride_pt"])  # the page-table width varies per batch
def paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tiles_ptr,
    seq_lens_ptr, page_table_ptr, query_start_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_pt, stride_kp, stride_ks, stride_kh,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile * 2)
    q_first = tl.load(tiles_ptr + tile * 2 + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    row0 = tl.load(query_start_ptr + seq)
    num_new = tl.load(query_start_ptr + seq + 1) - row0
    offs_m = q_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < num_new
    d_ok = offs_d < HEAD_DIM
    rows = (row0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    context = seq_len - num_new + offs_m  # context index of each query row
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_off = (head // GROUP) * stride_kh
    key_end = tl.minimum(seq_len, seq_len - num_new + q_first + BLOCK_M)
    for n0 in range(0, key_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_end
        offsets = _page_offsets(page_table_ptr, seq, offs_n, n_ok, stride_pt, stride_kp,
                                stride_ks, kv_off, PAGE_SIZE)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + offsets[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s_mask = n_ok[None, :] & (offs_n[None, :] <= context[:, None])
        m_i, l_i, acc = _attend_block(q, k, v, s_mask, m_i, l_i, acc, scale_log2,
                                      PRECISION, UPCAST)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
