"""valora's engine vs Hugging Face transformers on the same tiny LLaVA checkpoint (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_reference import hf_greedy, hf_inputs, load_hf
from PIL import Image

from valora import LLM, SamplingParams

PROMPTS = {
    "text": ("USER: How many shapes are there? ASSISTANT:", 0),
    "one_image": ("USER: <image>\nWhat colour is the square? ASSISTANT:", 1),
    "two_images": ("USER: <image>\nand <image>\nWhich one has a circle? ASSISTANT:", 2),
}


@pytest.fixture(scope="module")
def hf(tiny_llava: Path):  # type: ignore[no-untyped-def]
    return load_hf(tiny_llava)


@pytest.fixture(scope="module")
def llm(tiny_llava: Path) -> LLM:
    return LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=256, page_size=8)


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_32_tokens_and_logprobs_match_transformers(
    case: str, hf, llm: LLM, images: list[Image.Image]
) -> None:  # type: ignore[no-untyped-def]
    prompt, num_images = PROMPTS[case]
    chosen = images[:num_images]
    model, processor = hf
    inputs = hf_inputs(processor, prompt, chosen)
    ref_tokens, ref_logprobs = hf_greedy(model, inputs, 32)
    params = SamplingParams(
        max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=3, skip_special_tokens=False
    )
    out = llm.generate([{"prompt": prompt, "images": chosen, "sampling_params": params}])[0]
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    completion = out.outputs[0]
    assert completion.token_ids == ref_tokens
    assert completion.logprobs is not None and len(completion.logprobs) == 32
    for step, (entry, ref) in enumerate(zip(completion.logprobs, ref_logprobs, strict=True)):
        for token, value in entry.top.items():
            expected = float(ref[token])
            assert abs(value - expected) <= 1e-4 * max(1.0, abs(expected)), (
                step,
                token,
                value,
                expected,
            )
        assert abs(entry.logprob - float(ref[entry.token_id])) <= 1e-4 * max(
            1.0, abs(entry.logprob)
        )


def test_batched_cases_match_their_single_runs(llm: LLM, images: list[Image.Image]) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = [
        {"prompt": p, "images": images[:n], "sampling_params": params} for p, n in PROMPTS.values()
    ]
    together = llm.generate(requests)
    alone = [llm.generate([r])[0] for r in requests]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
