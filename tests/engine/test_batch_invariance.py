"""A request's tokens do not depend on what it runs with: alone, batched, chunked, cached, preempted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valora import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(
    max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True
)


def _requests(images: list[Image.Image], adapters: dict[str, Path]) -> list[dict[str, Any]]:
    prompts = [
        ("USER: <image>\nWhat is shown here? ASSISTANT:", images[:1], "r16"),
        ("USER: Tell me about the quick brown fox. ASSISTANT:", [], None),
        ("USER: <image>\n<image>\nCompare them. ASSISTANT:", images[1:3], "r4"),
        ("USER: How many digits? ASSISTANT:", [], "r64"),
    ]
    out = []
    for i, (prompt, imgs, adapter) in enumerate(prompts):
        params = GREEDY if i % 2 == 0 else SAMPLED
        out.append(
            {"prompt": prompt, "images": imgs, "adapter": adapter, "sampling_params": params}
        )
    return out


def _tokens(llm: LLM, requests: list[dict[str, Any]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(requests)]


def _llm(model: Path, adapters: dict[str, Path], **options: Any) -> LLM:
    base: dict[str, Any] = dict(
        dtype="float32", device="cpu", max_loras=4, max_lora_rank=64, page_size=8
    )
    base.update(options)
    return LLM(model=str(model), adapters=adapters, **base)


@pytest.fixture(scope="module")
def reference(
    tiny_llava: Path, tiny_adapters: dict[str, Path], images: list[Image.Image]
) -> list[list[int]]:
    llm = _llm(
        tiny_llava, tiny_adapters, num_pages=256, enable_prefix_caching=False, chunked_prefill=False
    )
    return [_tokens(llm, [r])[0] for r in _requests(images, tiny_adapters)]


def test_batched_equals_alone(
    tiny_llava: Path,
    tiny_adapters: dict[str, Path],
    images: list[Image.Image],
    reference: list[list[int]],
) -> None:
    llm = _llm(
        tiny_llava, tiny_adapters, num_pages=256, enable_prefix_caching=False, chunked_prefill=False
    )
    assert _tokens(llm, _requests(images, tiny_adapters)) == reference


def test_chunked_prefill_equals_whole(
    tiny_llava: Path,
    tiny_adapters: dict[str, Path],
    images: list[Image.Image],
    reference: list[list[int]],
) -> None:
    llm = _llm(
        tiny_llava,
        tiny_adapters,
        num_pages=256,
        chunked_prefill=True,
        max_num_batched_tokens=7,
        enable_prefix_caching=False,
    )
    assert _tokens(llm, _requests(images, tiny_adapters)) == reference


def test_prefix_cache_hit_equals_miss(
    tiny_llava: Path,
    tiny_adapters: dict[str, Path],
    images: list[Image.Image],
    reference: list[list[int]],
) -> None:
    llm = _llm(tiny_llava, tiny_adapters, num_pages=256, enable_prefix_caching=True)
    requests = _requests(images, tiny_adapters)
    first = llm.generate(requests)
    second = llm.generate(requests)
    assert [o.outputs[0].token_ids for o in first] == reference
    assert [o.outputs[0].token_ids for o in second] == reference
    assert all(o.num_cached_tokens > 0 for o in second[:1]), (
        "the second run should hit the prefix cache"
    )


def test_different_adapter_or_image_does_not_share_prefix(
    tiny_llava: Path, tiny_adapters: dict[str, Path], images: list[Image.Image]
) -> None:
    llm = _llm(tiny_llava, tiny_adapters, num_pages=256, enable_prefix_caching=True)
    prompt = "USER: <image>\nWhat is shown here in this picture of many things? ASSISTANT:"
    llm.generate(
        [{"prompt": prompt, "images": images[:1], "adapter": "r4", "sampling_params": GREEDY}]
    )
    other_adapter = llm.generate(
        [{"prompt": prompt, "images": images[:1], "adapter": "r16", "sampling_params": GREEDY}]
    )[0]
    other_image = llm.generate(
        [{"prompt": prompt, "images": images[1:2], "adapter": "r4", "sampling_params": GREEDY}]
    )[0]
    same = llm.generate(
        [{"prompt": prompt, "images": images[:1], "adapter": "r4", "sampling_params": GREEDY}]
    )[0]
    assert other_adapter.num_cached_tokens == 0
    assert other_image.num_cached_tokens < 8  # only pages before the image may be shared
    assert same.num_cached_tokens > 0


def test_preemption_recompute_gives_same_tokens(
    tiny_llava: Path,
    tiny_adapters: dict[str, Path],
    images: list[Image.Image],
    reference: list[list[int]],
) -> None:
    # Few pages: running requests must be preempted and recomputed to make room.
    llm = _llm(
        tiny_llava,
        tiny_adapters,
        num_pages=14,
        enable_prefix_caching=False,
        max_num_batched_tokens=64,
    )
    outputs = llm.generate(_requests(images, tiny_adapters))
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert llm.engine.num_preemptions > 0
