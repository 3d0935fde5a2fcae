"""The ``"triton"`` paged-attention backend against the torch reference twin.

CPU: Triton's interpreter on tiny shapes (decode with and without split-K, GQA groups 1/2/4,
mixed prefill chunks with cached context and decodes, page sizes 1/4/16, head dims that are not
powers of two). ``gpu``: the same at LLaVA-7B head shapes and long contexts.
"""

from __future__ import annotations

import pytest
import torch
from attn_cases import DEVICE, TOLERANCE, make_case, reference, rel_err, run_backend
from hypothesis import given
from hypothesis import strategies as st

from valora.errors import ValoraError
from valora.layers.attention import available_attention_backends, create_attention_backend
from valora.layers.attention_triton import MAX_SPLITS, TritonPagedAttention, choose_splits

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def small_blocks(**kwargs: int) -> TritonPagedAttention:
    """Blocks of 16 so that tiny contexts still span several blocks and splits."""
    return TritonPagedAttention(decode_block_n=16, prefill_block_m=16, prefill_block_n=16,
                                **kwargs)


def check(backend: TritonPagedAttention, query_lens: list[int], cached: list[int],
          **shape: object) -> None:
    case = make_case(query_lens, cached, device=DEVICE, **shape)  # type: ignore[arg-type]
    want, want_cache = reference(case)
    out, got_cache = run_backend(backend, case)
    assert torch.isfinite(out).all(), "an output row was never written (or overflowed)"
    assert rel_err(out, want) <= TOLERANCE[case.query.dtype]
    for got_part, want_part in zip(got_cache, want_cache, strict=True):
        assert torch.equal(got_part.float().cpu(), want_part.cpu()), "K/V write differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 2)])
def test_decode_split_k(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """Few decodes: the contexts are split over several programs and reduced."""
    backend = small_blocks()
    backend.configure(heads, kv_heads, 16)
    case = make_case([1, 1, 1], [4, 37, 70], num_heads=heads, num_kv_heads=kv_heads)
    assert backend.plan(case.attn).num_splits > 1
    check(backend, [1, 1, 1], [4, 37, 70], num_heads=heads, num_kv_heads=kv_heads, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_single_split(dtype: torch.dtype) -> None:
    backend = small_blocks(programs_per_sm=0)  # target 0 programs: never split
    check(backend, [1, 1], [0, 45], dtype=dtype)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_prefill_chunks_and_decodes(dtype: torch.dtype, page_size: int) -> None:
    """A fresh prompt, a chunk after cached context (chunked prefill / prefix hit), decodes."""
    check(small_blocks(), [19, 1, 7, 1, 2], [0, 30, 22, 3, 16], page_size=page_size,
          dtype=dtype)


@pytest.mark.parametrize("head_dim", [8, 24])
def test_head_dims_not_powers_of_two(head_dim: int) -> None:
    check(small_blocks(), [5, 1], [9, 20], head_dim=head_dim, num_heads=6, num_kv_heads=3)


def test_padding_rows_of_length_zero_give_zeros() -> None:
    """CUDA-graph padding rows have seq_len 0: finite zeros, nothing read."""
    case = make_case([1, 1], [6, 3], device=DEVICE)
    case.attn.seq_lens[1] = 0
    out, _ = run_backend(small_blocks(), case)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    want, _ = reference(make_case([1, 1], [6, 3], device=DEVICE))
    assert rel_err(out[0], want[0]) <= TOLERANCE[torch.float32]


def test_all_decode_plan_builds_nothing_from_host_data() -> None:
    """What makes the decode plan CUDA-graph capturable: no host → device copies."""
    backend = small_blocks()
    backend.configure(4, 2, 16)
    case = make_case([1, 1, 1, 1], [3, 5, 8, 2])
    plan = backend.plan(case.attn)
    assert plan.decode_seqs is None and plan.prefill_tiles is None
    assert plan.num_splits * plan.split_len >= max(case.attn.seq_lens_cpu)
    mixed = backend.plan(make_case([1, 3], [3, 5]).attn)
    assert mixed.decode_seqs is not None and mixed.decode_seqs.tolist() == [0]
    assert mixed.num_prefill_tiles == 1


def test_registered_and_rejects_bad_input() -> None:
    assert "triton" in available_attention_backends()
    backend = create_attention_backend("triton")
    case = make_case([1], [3])
    with pytest.raises(ValoraError):
        backend.forward(case.query, case.key, case.value, case.cache, case.attn, object(),
                        case.scale)
    half_cache = (case.cache[0].half(), case.cache[1].half())
    with pytest.raises(ValoraError):
        backend.forward(case.query, case.key, case.value, half_cache, case.attn,
                        backend.plan(case.attn), case.scale)


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_writes_into_a_given_output(name: str) -> None:
    """``out``: both backends write the result there (decodes and a prefill chunk in one step,
    a NaN-filled buffer) and return it; a buffer of the wrong shape or layout is refused."""
    backend = small_blocks() if name == "triton" else create_attention_backend("torch")
    case = make_case([1, 5, 1], [7, 2, 20], device=DEVICE)
    want, _ = run_backend(backend, case)
    out = torch.full_like(case.query, float("nan"))
    cache = (case.cache[0].clone(), case.cache[1].clone())
    plan = backend.plan(case.attn)
    got = backend.forward(case.query, case.key, case.value, cache, case.attn, plan, case.scale,
                          out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, want)
    for bad in (out[:-1], out.transpose(0, 1).contiguous().transpose(0, 1)):
        with pytest.raises(ValoraError, match="attention out"):
            backend.forward(case.query, case.key, case.value, cache, case.attn, plan,
                            case.scale, bad)


@given(num_decodes=st.integers(0, 300), kv_heads=st.integers(1, 64),
       max_len=st.integers(0, 40_000), block_n=st.sampled_from([16, 32, 64, 128]),
       target=st.integers(0, 2000))
def test_choose_splits_covers_the_context(num_decodes: int, kv_heads: int, max_len: int,
                                          block_n: int, target: int) -> None:
    splits, split_len = choose_splits(num_decodes, kv_heads, max_len, block_n, target)
    assert 1 <= splits <= MAX_SPLITS and split_len % block_n == 0
    assert splits * split_len >= max_len and (splits - 1) * split_len < max(max_len, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 32), (32, 8)])
def test_gpu_llava_shapes(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """Head dim 128, pages of 16: decodes at batch 1 (split) and 64, and image-prompt prefill
    chunks after cached context, against the fp32 reference."""
    shape = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": 128, "page_size": 16,
             "dtype": dtype}
    check(TritonPagedAttention(), [1], [3000], **shape)
    check(TritonPagedAttention(), [1] * 64, [600 + 7 * i for i in range(64)], **shape)
    check(TritonPagedAttention(), [600, 1, 256, 1], [0, 900, 340, 17], **shape)
