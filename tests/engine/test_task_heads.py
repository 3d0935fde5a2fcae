"""Task-head adapters answer in one forward pass through the engine, from the same hidden states
transformers + PEFT compute."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from engine_reference import hf_inputs, load_hf
from PIL import Image

from valora import LLM, SamplingParams
from valora.errors import InvalidRequestError
from valora.heads import HeadSpec, build_task_head, save_task_head

PROMPT = "USER: <image>\nWhich colour dominates? ASSISTANT:"
LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def head_adapter(tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapter r16 plus a classification head (default) and a named detection head."""
    root = tmp_path_factory.mktemp("head_adapter") / "colour"
    shutil.copytree(tiny_adapters["r16"], root)
    torch.manual_seed(0)
    classify = build_task_head(
        HeadSpec(
            kind="classification",
            task="colour",
            labels=LABELS,
            hidden_size=64,
            num_input_tokens=1,
            params={"mlp_hidden": 32},
        )
    )
    save_task_head(classify, root)
    detect = build_task_head(
        HeadSpec(
            kind="detection", task="boxes", labels=("shape",), hidden_size=64, num_input_tokens=12
        )
    )
    save_task_head(detect, root / "heads" / "boxes")
    return root


@pytest.fixture(scope="module")
def llm(tiny_llava: Path, head_adapter: Path) -> LLM:
    # A small token budget forces chunked prefill: the head's window spans several chunks.
    return LLM(
        model=str(tiny_llava),
        dtype="float32",
        device="cpu",
        num_pages=128,
        page_size=8,
        max_loras=2,
        max_lora_rank=64,
        max_num_batched_tokens=9,
        adapters={"colour": head_adapter},
    )


def _peft_hidden(tiny_llava: Path, adapter_dir: Path, image: Image.Image) -> torch.Tensor:
    from peft import PeftModel

    base, processor = load_hf(tiny_llava)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    inputs = hf_inputs(processor, PROMPT, [image])
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1][0]  # final-normed decoder states, the LM head's input


def test_classification_head_answers_with_label_and_scores(
    llm: LLM, tiny_llava: Path, head_adapter: Path, images: list[Image.Image]
) -> None:
    out = llm.generate(
        [
            {
                "prompt": PROMPT,
                "images": images[:1],
                "adapter": "colour",
                "sampling_params": SamplingParams(max_tokens=16),
            }
        ]
    )[0]
    completion = out.outputs[0]
    assert completion.text in LABELS and completion.finish_reason == "stop"
    assert completion.token_ids == []  # no decoding happened
    result = completion.head_result
    assert result is not None and set(result["scores"]) == set(LABELS)
    from valora.heads import load_task_head

    head = load_task_head(head_adapter)
    assert head is not None
    hidden = _peft_hidden(tiny_llava, head_adapter, images[0])
    expected = head.run(hidden)
    assert expected.label == completion.text
    for label in LABELS:
        assert abs(expected.scores[label] - result["scores"][label]) < 1e-4


def test_named_detection_head_and_plain_decoding_share_the_adapter(
    llm: LLM, images: list[Image.Image]
) -> None:
    outputs = llm.generate(
        [
            {"prompt": PROMPT, "images": images[:1], "adapter": "colour", "task": "boxes"},
            {"prompt": PROMPT, "images": images[1:2], "adapter": "colour"},
        ]
    )
    boxes = outputs[0].outputs[0].head_result
    assert boxes is not None and isinstance(boxes.get("boxes"), list)
    assert outputs[1].outputs[0].head_result is not None  # default head answers plain requests


def test_head_window_is_recomputed_on_prefix_cache_hits(
    llm: LLM, images: list[Image.Image]
) -> None:
    request = {"prompt": PROMPT, "images": images[2:3], "adapter": "colour", "task": "boxes"}
    first, second = llm.generate([request])[0], llm.generate([request])[0]
    assert second.num_cached_tokens > 0
    assert first.outputs[0].head_result == second.outputs[0].head_result


def test_unknown_task_is_rejected(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="no task head"):
        llm.generate([{"prompt": "USER: hi ASSISTANT:", "adapter": "colour", "task": "nope"}])


def test_heads_under_async_scheduling_answer_as_the_synchronous_engine(
    llm: LLM, tiny_llava: Path, head_adapter: Path, images: list[Image.Image]
) -> None:
    """A head request ends with its hidden states (no placeholder, no extra row) while a plain
    request in the same batches decodes; the answers equal the synchronous engine's."""
    overlapped = LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=128,
                     page_size=8, max_loras=2, max_lora_rank=64, max_num_batched_tokens=9,
                     adapters={"colour": head_adapter}, async_scheduling=True)
    requests = [
        {"prompt": PROMPT, "images": images[:1], "adapter": "colour", "task": "boxes"},
        {"prompt": PROMPT, "images": images[1:2], "adapter": "colour"},
        {"prompt": "USER: name a colour ASSISTANT:",
         "sampling_params": SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)},
    ]
    want, got = llm.generate(requests), overlapped.generate(requests)
    for a, b in zip(want, got, strict=True):
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        assert (a.outputs[0].head_result is None) == (b.outputs[0].head_result is None)
    assert got[0].outputs[0].head_result == want[0].outputs[0].head_result  # same batches
    assert got[1].outputs[0].head_result == want[1].outputs[0].head_result
    assert not overlapped.engine.has_unfinished_requests() and not overlapped.engine.requests
