"""Asynchronous scheduling (the CUDA default) against the synchronous order on the same CUDA
engine configuration: the same kernels, graphs and sampler random streams, so every output must
be the same — tokens, texts, finish and stop reasons, logprobs — for the CPU tests' mixed batch
(greedy and seeded sampling, adapters, an image, stop strings / ids that end requests with a
dropped row in flight, ``min_tokens``, logprobs, more requests than ``max_num_seqs``), with
chunked prefill, and under KV pressure that preempts requests with a token in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from valora import LLM, SamplingParams
from valora.testing.mixed_requests import logprob_values, mixed_requests, summary

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8"))]


def _pair(model: Path, adapters: dict[str, Path], **options: Any) -> tuple[LLM, LLM]:
    """The synchronous and the asynchronous engine on CUDA, otherwise alike."""
    torch.cuda.empty_cache()
    made = tuple(LLM(model=str(model), dtype="float32", device="cuda", page_size=16, max_loras=4,
                     max_lora_rank=16, adapters=adapters, async_scheduling=flag, **options)
                 for flag in (False, None))
    assert not made[0].engine.async_scheduling and made[1].engine.async_scheduling
    return made  # type: ignore[return-value]


def _assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine._in_flight is None
    pool = engine.parts.kv_manager.pool
    assert pool.num_free_pages == pool.num_usable_pages


@pytest.mark.parametrize("budget", [2048, 24], ids=["whole-prefill", "chunked-prefill"])
def test_mixed_batch_equals_the_synchronous_order(tiny_llava: Path, adapters: dict[str, Path],
                                                  budget: int) -> None:
    sync, overlapped = _pair(tiny_llava, adapters, num_pages=256, max_num_seqs=3,
                             max_num_batched_tokens=budget)
    requests = mixed_requests(sync, _images())
    want, got = sync.generate(requests), overlapped.generate(requests)
    assert all(o.error is None for o in got), [o.error for o in got]
    assert [summary(o) for o in got] == [summary(o) for o in want]
    for a, b in zip(want, got, strict=True):
        assert logprob_values(b) == pytest.approx(logprob_values(a), abs=1e-4)
    assert {"stop", "length"} <= {o.outputs[0].finish_reason for o in want}
    assert overlapped.engine.parts.runner.num_graph_steps > 0
    for llm in (sync, overlapped):
        _assert_idle(llm)


def test_preemption_under_kv_pressure_gives_the_same_tokens(tiny_llava: Path,
                                                             adapters: dict[str, Path]) -> None:
    """Six pages of 16 tokens for three requests of ≈ 12 + 24 tokens: running requests are
    preempted (recomputed later), under asynchronous scheduling while a token of theirs is
    still in flight."""
    sync, overlapped = _pair(tiny_llava, adapters, num_pages=6, max_num_seqs=3)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt": f"USER: question {i} about the picture ASSISTANT:",
                "adapter": ("r4", None, "r16")[i]} for i in range(3)]
    want = [o.outputs[0].token_ids for o in sync.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in overlapped.generate(prompts, params)]
    assert got == want
    assert overlapped.engine.num_preemptions > 0
    for llm in (sync, overlapped):
        _assert_idle(llm)
