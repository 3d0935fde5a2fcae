"""Bad input fails that one request with a typed error naming the problem; the engine keeps serving."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from valora import LLM, SamplingParams
from valora.errors import (
    AdapterNotFoundError,
    ImageError,
    InvalidAdapterError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
)
from valora.testing.checkpoints import build_tiny_adapter

OK = {
    "prompt": "USER: hello ASSISTANT:",
    "sampling_params": SamplingParams(max_tokens=4, temperature=0.0),
}


@pytest.fixture(scope="module")
def llm(tiny_llava: Path, tiny_adapters: dict[str, Path]) -> LLM:
    return LLM(
        model=str(tiny_llava),
        dtype="float32",
        device="cpu",
        num_pages=128,
        page_size=8,
        max_loras=2,
        max_lora_rank=64,
        max_image_pixels=100_000,
        adapters={"r4": tiny_adapters["r4"]},
    )


def _still_serves(llm: LLM) -> None:
    out = llm.generate([OK])[0]
    assert out.finished and len(out.outputs[0].token_ids) == 4


def test_unknown_adapter(llm: LLM) -> None:
    with pytest.raises(AdapterNotFoundError, match="nope"):
        llm.generate([{**OK, "adapter": "nope"}])
    _still_serves(llm)


def _png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"definitely not an image", "image"),
        (_png_bytes((32, 32))[:60], "image"),
        (_png_bytes((1000, 1000)), "pixel"),
    ],
)
def test_bad_images(llm: LLM, payload: bytes, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        llm.generate([{"prompt": "USER: <image>\nhi ASSISTANT:", "images": [payload]}])
    _still_serves(llm)


def test_image_count_mismatch(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="image"):
        llm.generate(
            [{"prompt": "USER: <image>\n<image>\nhi ASSISTANT:", "images": [_png_bytes((32, 32))]}]
        )
    _still_serves(llm)


def test_prompt_too_long(llm: LLM) -> None:
    with pytest.raises(PromptTooLongError, match="context"):
        llm.generate([{"prompt": "word " * 3000}])
    _still_serves(llm)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 0}, {"top_k": -3}, {"logprobs": 99}],
)
def test_invalid_sampling_params(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_one_bad_request_in_a_batch_runs_nothing(llm: LLM) -> None:
    with pytest.raises(AdapterNotFoundError):
        llm.generate([OK, {**OK, "adapter": "missing"}])
    assert not llm.engine.has_unfinished_requests()
    _still_serves(llm)


def test_bad_adapter_directories(
    llm: LLM, tiny_llava: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(InvalidAdapterError):
        llm.load_adapter("missing", missing)
    wrong_rank = tmp_path / "wrong_rank"
    shutil.copytree(tiny_adapters["r4"], wrong_rank)
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    config["r"] = 5
    (wrong_rank / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapterError, match=r"rank|r="):
        llm.load_adapter("wrong_rank", wrong_rank)
    too_big = build_tiny_adapter(tiny_llava, tmp_path / "too_big", 128)
    with pytest.raises(InvalidAdapterError, match="rank"):
        llm.load_adapter("too_big", too_big)
    _still_serves(llm)


def test_unknown_request_field(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="unknown request field"):
        llm.generate([{**OK, "temprature": 0.5}])


def test_adapter_unloaded_while_request_waits_fails_only_that_request(
    tiny_llava: Path, tiny_adapters: dict[str, Path]
) -> None:
    from valora.engine.inputs import GenerateRequest

    llm = LLM(
        model=str(tiny_llava),
        dtype="float32",
        device="cpu",
        num_pages=64,
        page_size=8,
        max_loras=2,
        max_lora_rank=64,
        adapters={"r4": tiny_adapters["r4"], "r16": tiny_adapters["r16"]},
    )
    engine = llm.engine
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    doomed = engine.add_request(
        GenerateRequest(prompt="USER: a ASSISTANT:", adapter="r4", sampling_params=params)
    )
    fine = engine.add_request(
        GenerateRequest(prompt="USER: b ASSISTANT:", adapter="r16", sampling_params=params)
    )
    llm.unload_adapter("r4")  # not pinned yet: nothing has been scheduled
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[doomed.request_id].outputs[0].finish_reason == "error"
    assert "r4" in (finals[doomed.request_id].error or "")
    assert len(finals[fine.request_id].outputs[0].token_ids) == 3
    _still_serves(llm)
