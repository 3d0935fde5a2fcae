"""Load: 64 concurrent clients send 1024 mixed-adapter requests (chat with and without images,
streamed and not, and text completions) to ``valora serve`` over loopback.

Every response must arrive and equal the same request run alone, greedily, in-process; afterwards
the server must be back at idle: no KV pages in use, no adapter pinned, nothing in flight.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from server_helpers import BASE_NAME, Served, data_url, metric_values, png_bytes, wait_until

from valora import LLM, SamplingParams
from valora.engine.inputs import GenerateRequest

NUM_CLIENTS = 64
NUM_REQUESTS = 1024
MAX_TOKENS = 4
ADAPTERS = (None, "r4", "r8", "r16")  # three adapters over two slots: slot contention too
PROMPTS = [f"Question {i}: what is {word}?" for i, word in
           enumerate(["red", "a cat", "seven", "the sky", "LoRA", "a box", "up", "tiny", "x", "blue"])]
IMAGES = [png_bytes(100 + i, (24 + 8 * i, 32)) for i in range(3)]


@dataclass(frozen=True)
class Case:
    kind: str  # "chat", "chat-stream" or "completion"
    prompt: int
    adapter: str | None
    image: int | None

    @property
    def key(self) -> tuple[str, int, str | None, int | None]:
        return ("completion" if self.kind == "completion" else "chat", self.prompt, self.adapter,
                self.image)


def make_cases() -> list[Case]:
    rng = random.Random(1234)
    cases = []
    for i in range(NUM_REQUESTS):
        kind = ("chat", "chat-stream", "completion")[i % 3]
        image = rng.randrange(len(IMAGES)) if kind != "completion" and rng.random() < 0.4 else None
        cases.append(Case(kind, rng.randrange(len(PROMPTS)), rng.choice(ADAPTERS), image))
    return cases


def reference_answers(llm: LLM, keys: set[tuple[str, int, str | None, int | None]]
                      ) -> dict[tuple[str, int, str | None, int | None], str]:
    """Each distinct request run alone (one ``generate`` call each), greedy."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    answers = {}
    for key in sorted(keys, key=str):
        kind, prompt, adapter, image = key
        if kind == "completion":
            spec = GenerateRequest(prompt=PROMPTS[prompt], adapter=adapter, sampling_params=params)
        else:
            images = [IMAGES[image]] if image is not None else []
            content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
            content.append({"type": "text", "text": PROMPTS[prompt]})
            spec = GenerateRequest(messages=[{"role": "user", "content": content}], images=images,
                                   adapter=adapter, sampling_params=params)
        answers[key] = llm.generate([spec])[0].text
    return answers


async def send(client: openai.AsyncOpenAI, case: Case) -> str:
    model = case.adapter or BASE_NAME
    if case.kind == "completion":
        response = await client.completions.create(model=model, prompt=PROMPTS[case.prompt],
                                                   max_tokens=MAX_TOKENS, temperature=0.0)
        return response.choices[0].text
    content: list[dict[str, Any]] = []
    if case.image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(IMAGES[case.image])}})
    content.append({"type": "text", "text": PROMPTS[case.prompt]})
    messages: Any = [{"role": "user", "content": content}]
    if case.kind == "chat":
        chat = await client.chat.completions.create(model=model, messages=messages,
                                                    max_tokens=MAX_TOKENS, temperature=0.0)
        return chat.choices[0].message.content or ""
    stream = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                  max_tokens=MAX_TOKENS, temperature=0.0)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def run_load(served: Served, cases: list[Case]) -> dict[int, str | BaseException]:
    results: dict[int, str | BaseException] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(cases)):
        queue.put_nowait(index)
    async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=served.api_key,
                                  max_retries=0, timeout=300.0) as client:
        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                try:
                    results[index] = await send(client, cases[index])
                except Exception as exc:  # recorded and asserted on below
                    results[index] = exc
        await asyncio.gather(*(worker() for _ in range(NUM_CLIENTS)))
    return results


@pytest.mark.slow
def test_concurrent_mixed_adapter_load(served: Served, reference_llm: LLM) -> None:
    cases = make_cases()
    expected = reference_answers(reference_llm, {case.key for case in cases})
    before = served.metrics()
    results = asyncio.run(run_load(served, cases))

    failures = {i: r for i, r in results.items() if isinstance(r, BaseException)}
    assert not failures, f"{len(failures)} failed, e.g. {next(iter(failures.values()))!r}"
    assert len(results) == NUM_REQUESTS
    mismatched = [(cases[i], results[i], expected[cases[i].key]) for i in range(NUM_REQUESTS)
                  if results[i] != expected[cases[i].key]]
    assert not mismatched, f"{len(mismatched)} mismatched, e.g. {mismatched[0]}"

    def idle() -> bool:
        samples = served.metrics()
        return (metric_values(samples, "valora_requests_in_flight") == [0.0]
                and metric_values(samples, "valora_engine_num_running") == [0.0])
    wait_until(idle, 60.0, "the server to go idle")
    after = served.metrics()
    assert metric_values(after, "valora_kv_pages_in_use") == [0.0]
    assert metric_values(after, "valora_engine_num_waiting") == [0.0]
    assert all(v == 0.0 for v in metric_values(after, "valora_adapter_pins"))
    assert metric_values(after, "valora_engine_adapters_num_pinned") == [0.0]
    assert (after["valora_engine_adapters_num_free_slots"]
            + after["valora_engine_adapters_num_resident"]) == 2
    finished = sum(metric_values(after, "valora_requests_finished_total"))
    assert finished - sum(metric_values(before, "valora_requests_finished_total")) == NUM_REQUESTS
