"""Sampling controls end to end, and that every page and adapter slot comes back."""

from __future__ import annotations

from pathlib import Path

import pytest

from valora import LLM, SamplingParams
from valora.engine.inputs import GenerateRequest


@pytest.fixture(scope="module")
def llm(tiny_llava: Path, tiny_adapters: dict[str, Path]) -> LLM:
    return LLM(
        model=str(tiny_llava),
        dtype="float32",
        device="cpu",
        num_pages=64,
        page_size=8,
        max_loras=2,
        max_lora_rank=64,
        adapters=tiny_adapters,
    )


def test_max_tokens_and_seeded_sampling_reproducible(llm: LLM) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    a = llm.generate([{"prompt": "USER: hi ASSISTANT:", "sampling_params": params}])[0]
    b = llm.generate([{"prompt": "USER: hi ASSISTANT:", "sampling_params": params}])[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert len(a.outputs[0].token_ids) == 10 and a.outputs[0].finish_reason == "length"


def test_stop_token_ids_and_stop_strings(llm: LLM) -> None:
    base = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, skip_special_tokens=False
    )
    full = llm.generate([{"prompt": "USER: stop ASSISTANT:", "sampling_params": base}])[0].outputs[
        0
    ]
    stop_id = full.token_ids[3]
    params = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,)
    )
    cut = llm.generate([{"prompt": "USER: stop ASSISTANT:", "sampling_params": params}])[0].outputs[
        0
    ]
    first = full.token_ids.index(stop_id)
    assert cut.token_ids == full.token_ids[: first + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id
    text = full.text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if needle.strip():
        params = SamplingParams(
            max_tokens=12,
            temperature=0.0,
            ignore_eos=True,
            stop=(needle,),
            skip_special_tokens=False,
        )
        out = llm.generate([{"prompt": "USER: stop ASSISTANT:", "sampling_params": params}])[
            0
        ].outputs[0]
        assert out.text == text[: text.index(needle)] and out.stop_reason == needle


def test_pages_and_slots_return_after_finish_and_abort(llm: LLM) -> None:
    engine = llm.engine
    pool = engine.parts.kv_manager.pool
    idle_free = pool.num_free_pages
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ids = []
    for i, adapter in enumerate(["r4", "r8", None, "r16", "r64", "r4"]):
        ids.append(
            engine.add_request(
                GenerateRequest(
                    prompt=f"USER: request {i} ASSISTANT:", adapter=adapter, sampling_params=params
                )
            ).request_id
        )
    engine.step()
    engine.step()
    engine.abort_request(ids[1])
    engine.abort_request(ids[4])
    while engine.has_unfinished_requests():
        engine.step()
    assert pool.num_free_pages == idle_free
    stats = engine.parts.adapters.stats()
    assert all(a.pin_count == 0 for a in engine.parts.adapters.list_adapters()), stats
