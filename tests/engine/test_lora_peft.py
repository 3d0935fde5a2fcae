"""A batch mixing four adapters of ranks {4, 8, 16, 64} and base rows vs PEFT's ``adapter_names``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_reference import hf_greedy, hf_inputs, load_hf
from PIL import Image

from valora import LLM, SamplingParams

PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
TEXT_PROMPT = "USER: What is the answer? ASSISTANT:"


@pytest.fixture(scope="module")
def peft_model(tiny_llava: Path, tiny_adapters: dict[str, Path]):  # type: ignore[no-untyped-def]
    from peft import PeftModel

    base, processor = load_hf(tiny_llava)
    names = list(tiny_adapters)
    model = PeftModel.from_pretrained(base, str(tiny_adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(tiny_adapters[name]), adapter_name=name)
    return model.eval(), processor


def test_mixed_adapter_batch_matches_peft(
    tiny_llava: Path, tiny_adapters: dict[str, Path], peft_model, images: list[Image.Image]
) -> None:  # type: ignore[no-untyped-def]
    model, processor = peft_model
    llm = LLM(
        model=str(tiny_llava),
        dtype="float32",
        device="cpu",
        max_loras=4,
        max_lora_rank=64,
        num_pages=256,
        page_size=8,
        adapters=tiny_adapters,
    )
    params = SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2, skip_special_tokens=False
    )
    cases: list[tuple[str | None, str, list[Image.Image]]] = [
        ("r4", PROMPT, images[:1]),
        (None, PROMPT, images[1:2]),
        ("r8", TEXT_PROMPT, []),
        ("r16", PROMPT, images[2:3]),
        ("r64", PROMPT, images[:1]),
        (None, TEXT_PROMPT, []),
        ("r64", TEXT_PROMPT, []),
    ]
    outputs = llm.generate(
        [
            {"prompt": p, "images": imgs, "adapter": a, "sampling_params": params}
            for a, p, imgs in cases
        ]
    )
    distinct = set()
    for (adapter, prompt, imgs), out in zip(cases, outputs, strict=True):
        inputs = hf_inputs(processor, prompt, imgs)
        tokens, ref_logprobs = hf_greedy(model, inputs, 8, adapter_names=[adapter or "__base__"])
        completion = out.outputs[0]
        assert completion.token_ids == tokens, adapter
        assert completion.logprobs is not None
        for entry, ref in zip(completion.logprobs, ref_logprobs, strict=True):
            assert abs(entry.logprob - float(ref[entry.token_id])) <= 1e-4 * max(
                1.0, abs(entry.logprob)
            )
        distinct.add(tuple(tokens))
    assert len(distinct) >= 4, "adapters should change the outputs (else the test proves nothing)"


def test_adapters_change_logits_vs_base(peft_model, images: list[Image.Image]) -> None:  # type: ignore[no-untyped-def]
    model, processor = peft_model
    inputs = hf_inputs(processor, PROMPT, images[:1])
    with torch.inference_mode():
        base = model(**inputs, adapter_names=["__base__"]).logits[0, -1]
        tuned = model(**inputs, adapter_names=["r16"]).logits[0, -1]
    assert (base - tuned).norm() / base.norm() > 1e-2
