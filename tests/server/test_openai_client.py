"""The official ``openai`` client against ``valora serve`` in a real uvicorn process.

Answers are checked against the same request run alone, greedily, through the in-process ``LLM``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from server_helpers import BASE_NAME, Served, data_url, png_bytes

from valora import LLM, SamplingParams
from valora.engine.inputs import GenerateRequest
from valora.heads import HeadSpec, build_task_head, save_task_head

GREEDY = {"temperature": 0.0, "max_tokens": 6}


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.api_key, max_retries=0,
                         timeout=120.0)


def reference_chat(llm: LLM, text: str, adapter: str | None, images: list[bytes],
                   max_tokens: int = 6) -> str:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": text})
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    request = GenerateRequest(messages=[{"role": "user", "content": content}], images=images,
                              adapter=adapter, sampling_params=params)
    return llm.generate([request])[0].text


def image_message(text: str, images: list[bytes]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(b)}}
                                   for b in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def test_chat_with_images_matches_the_engine_run_alone(client: openai.OpenAI,
                                                        reference_llm: LLM) -> None:
    images = [png_bytes(1), png_bytes(2, (24, 48))]
    response = client.chat.completions.create(
        model=BASE_NAME, messages=image_message("What is shown?", images), **GREEDY)
    choice = response.choices[0]
    assert choice.message.content == reference_chat(reference_llm, "What is shown?", None, images)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None and response.usage.completion_tokens <= 6
    # Image placeholders are expanded: the prompt holds far more tokens than its words.
    assert response.usage.prompt_tokens > 2 * 16


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = image_message("Describe it.", [png_bytes(3)])
    whole = client.chat.completions.create(model="r4", messages=messages, **GREEDY)
    stream = client.chat.completions.create(model="r4", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage


@pytest.mark.parametrize("adapter", ["r4", "r8", "r16"])
def test_adapters_by_name(client: openai.OpenAI, reference_llm: LLM, adapter: str) -> None:
    messages = [{"role": "user", "content": "Tell me about adapters."}]
    by_name = client.chat.completions.create(model=adapter, messages=messages, **GREEDY)
    by_pair = client.chat.completions.create(model=f"{BASE_NAME}:{adapter}", messages=messages,
                                             **GREEDY)
    expected = reference_chat(reference_llm, "Tell me about adapters.", adapter, [])
    assert by_name.choices[0].message.content == expected
    assert by_pair.choices[0].message.content == expected
    assert by_name.model == adapter


def test_completions_text_token_ids_and_batches(client: openai.OpenAI, reference_llm: LLM) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0)
    prompts = ["USER: one ASSISTANT:", "USER: two ASSISTANT:"]
    requests = [{"prompt": p, "adapter": "r16", "sampling_params": params} for p in prompts]
    expected = [o.text for o in reference_llm.generate(requests)]
    batch = client.completions.create(model="r16", prompt=prompts, max_tokens=5, temperature=0.0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected
    token_ids = reference_llm.engine.parts.tokenizer(prompts[0]).input_ids
    by_ids = client.completions.create(model="r16", prompt=token_ids, max_tokens=5, temperature=0.0)
    assert by_ids.choices[0].text == expected[0]
    streamed = client.completions.create(model="r16", prompt=prompts[1], max_tokens=5,
                                         temperature=0.0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected[1]


def test_logprobs_and_seeded_sampling(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Pick a number."}]
    response = client.chat.completions.create(model=BASE_NAME, messages=messages, logprobs=True,
                                              top_logprobs=3, **GREEDY)
    content = response.choices[0].logprobs.content
    assert content is not None and len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
    sampled = [client.chat.completions.create(model="r8", messages=messages, temperature=1.0,
                                              seed=7, max_tokens=8).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_token_budgets_stop_strings_and_extensions(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": "Count."}]
    full = client.chat.completions.create(model="r16", messages=messages, temperature=0.0,
                                          max_completion_tokens=8, max_tokens=2,
                                          extra_body={"ignore_eos": True, "top_k": 3})
    assert full.usage is not None and full.usage.completion_tokens == 8  # max_completion_tokens wins
    text = full.choices[0].message.content or ""
    stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip()), None)
    assert stop is not None, text
    cut = client.chat.completions.create(model="r16", messages=messages, temperature=0.0,
                                         max_completion_tokens=8, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_model_listing(client: openai.OpenAI, served: Served) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE_NAME, "r4", "r8", "r16"}
    assert getattr(models[BASE_NAME], "parent", None) is None
    for name, rank in (("r4", 4), ("r8", 8), ("r16", 16)):
        extra = models[name].model_extra or {}
        assert extra["parent"] == BASE_NAME and extra["rank"] == rank
        assert extra["residency"] in ("device", "cpu", "none")
        assert extra["pinned"] is True  # registered at start-up (--lora-modules)
    assert client.models.retrieve("r8").model_extra == models["r8"].model_extra
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-adapter")
        assert extra["root"] == str(served.adapters[name])


def test_load_use_and_unload_an_adapter(client: openai.OpenAI, served: Served) -> None:
    messages = [{"role": "user", "content": "hello"}]
    with served.client() as http:
        loaded = http.post("/v1/load_lora_adapter",
                           json={"lora_name": "spare", "lora_path": str(served.adapters["spare"])})
        assert loaded.status_code == 200, loaded.text
        assert "spare" in {m.id for m in client.models.list().data}
        answer = client.chat.completions.create(model="spare", messages=messages, **GREEDY)
        assert answer.choices[0].message.content is not None
        again = http.post("/v1/load_lora_adapter",
                          json={"lora_name": "spare", "lora_path": str(served.adapters["spare"])})
        assert again.status_code == 400 and "already registered" in again.json()["error"]["message"]
        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "spare"})
        assert unloaded.status_code == 200, unloaded.text
        missing = http.post("/v1/unload_lora_adapter", json={"lora_name": "spare"})
        assert missing.status_code == 404
    assert "spare" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError, match="spare"):
        client.chat.completions.create(model="spare", messages=messages, **GREEDY)


def test_errors_reach_the_client_typed(client: openai.OpenAI, served: Served) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(model=BASE_NAME, messages=messages, n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="no-such-adapter", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_task_head_adapter_answers_with_label_and_structured_result(
        client: openai.OpenAI, served: Served, tmp_path: Path) -> None:
    head_dir = tmp_path / "colour"
    shutil.copytree(served.adapters["r4"], head_dir)
    torch.manual_seed(0)
    spec = HeadSpec(kind="classification", task="colour", labels=("red", "green", "blue"),
                    hidden_size=64, params={"mlp_hidden": 16})
    save_task_head(build_task_head(spec), head_dir)
    with served.client() as http:
        loaded = http.post("/v1/load_lora_adapter",
                           json={"lora_name": "colour", "lora_path": str(head_dir)})
        assert loaded.status_code == 200, loaded.text
    try:
        messages = image_message("Which colour?", [png_bytes(4)])
        response = client.chat.completions.create(model="colour", messages=messages, **GREEDY)
        message = response.choices[0].message
        result = (message.model_extra or {})["valora_head_result"]
        assert message.content in spec.labels and result["label"] == message.content
        assert set(result["scores"]) == set(spec.labels)
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-4)
        assert response.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="colour", messages=messages,
                                                     stream=True, **GREEDY))
        streamed = [(c.choices[0].delta.model_extra or {}).get("valora_head_result")
                    for c in chunks if c.choices]
        assert [r for r in streamed if r is not None] == [result]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    finally:
        with served.client() as http:
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "colour"}).status_code == 200
