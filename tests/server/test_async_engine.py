"""``AsyncEngine`` without HTTP: streaming outputs, aborts, limits, adapter commands, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import ENGINE_OPTIONS, wait_until

from valora import LLM, SamplingParams
from valora.config import EngineConfig
from valora.engine.async_engine import AsyncEngine, RequestFailedError, failure_error
from valora.engine.inputs import GenerateRequest
from valora.errors import (
    AdapterNotFoundError,
    EngineDeadError,
    InvalidAdapterError,
    InvalidRequestError,
    PromptTooLongError,
)


@pytest.fixture
def engine(tiny_model: Path) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine.from_config(EngineConfig.create(model=str(tiny_model), **ENGINE_OPTIONS))
    yield async_engine
    async_engine.shutdown()


def greedy(prompt: str, max_tokens: int = 6, adapter: str | None = None) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, adapter=adapter,
                           sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                          ignore_eos=True))


def idle_pages_used(engine: AsyncEngine) -> int:
    return engine.submit(lambda e: e.parts.kv_manager.pool.num_used_pages).result()


def test_concurrent_generations_stream_and_match_the_sync_engine(engine: AsyncEngine,
                                                                 reference_llm: LLM) -> None:
    prompts = [f"USER: item {i} ASSISTANT:" for i in range(8)]

    async def run(prompt: str) -> tuple[str, str, int]:
        deltas, last = [], None
        async for output in engine.generate(greedy(prompt)):
            deltas.append(output.outputs[0].delta_text)
            last = output
        assert last is not None and last.finished
        return "".join(deltas), last.text, len(last.outputs[0].token_ids)

    async def main() -> list[tuple[str, str, int]]:
        return list(await asyncio.gather(*(run(p) for p in prompts)))
    results = asyncio.run(main())
    expected = reference_llm.generate([greedy(p) for p in prompts])
    for (streamed, final, num_tokens), reference in zip(results, expected, strict=True):
        assert streamed == final == reference.text and num_tokens == 6
    assert idle_pages_used(engine) == 0


def test_async_scheduling_streams_the_sync_engines_text(tiny_model: Path,
                                                         reference_llm: LLM) -> None:
    """The engine thread with ``async_scheduling``: every stream ends with the synchronous
    engine's text and the engine goes idle (no step left in flight) with its pages back."""
    async_engine = AsyncEngine.from_config(EngineConfig.create(
        model=str(tiny_model), **ENGINE_OPTIONS, async_scheduling=True))
    prompts = [f"USER: item {i} ASSISTANT:" for i in range(5)]

    async def run(prompt: str) -> str:
        deltas = [o.outputs[0].delta_text async for o in async_engine.generate(greedy(prompt))]
        return "".join(deltas)

    async def main() -> list[str]:
        return list(await asyncio.gather(*(run(p) for p in prompts)))
    try:
        texts = asyncio.run(main())
        expected = reference_llm.generate([greedy(p) for p in prompts])
        assert texts == [o.text for o in expected]
        assert idle_pages_used(async_engine) == 0
        assert not async_engine.submit(lambda e: e.has_unfinished_requests()).result()
    finally:
        async_engine.shutdown()


def test_async_output_processing_streams_every_token_through_the_sink(
        tiny_model: Path, reference_llm: LLM) -> None:
    """With asynchronous output processing the deferred half's outputs reach the streams through
    the engine's ``output_sink`` mid-step: every token count arrives once, in order, and the
    texts equal the synchronous engine's."""
    async_engine = AsyncEngine.from_config(EngineConfig.create(
        model=str(tiny_model), **{**ENGINE_OPTIONS, "async_output_processing": True}))
    try:
        assert async_engine.engine.output_sink is not None
        prompts = [f"USER: item {i} ASSISTANT:" for i in range(4)]

        async def run(prompt: str) -> tuple[list[int], str]:
            counts, last = [], None
            async for output in async_engine.generate(greedy(prompt)):
                counts.append(len(output.outputs[0].token_ids))
                last = output
            assert last is not None and last.finished
            return counts, last.text

        async def main() -> list[tuple[list[int], str]]:
            return list(await asyncio.gather(*(run(p) for p in prompts)))
        results = asyncio.run(main())
        expected = reference_llm.generate([greedy(p) for p in prompts])
        for (counts, text), reference in zip(results, expected, strict=True):
            assert counts == [1, 2, 3, 4, 5, 6] and text == reference.text
        assert idle_pages_used(async_engine) == 0
    finally:
        async_engine.shutdown()


def test_leaving_early_aborts_and_frees_pages(engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = await engine.add_request(greedy("USER: long ASSISTANT:", max_tokens=500))
        async for output in stream:
            if len(output.outputs[0].token_ids) >= 3:
                break
        assert idle_pages_used(engine) > 0
        stream.close()
    asyncio.run(main())
    wait_until(lambda: not engine.submit(lambda e: e.has_unfinished_requests()).result(), 30.0)
    assert idle_pages_used(engine) == 0 and engine.health().num_in_flight == 0


def test_rejections_queue_nothing(engine: AsyncEngine, tiny_adapters: dict[str, Path]) -> None:
    async def main() -> None:
        with pytest.raises(PromptTooLongError, match="at most 5"):
            await engine.add_request(greedy("USER: a prompt longer than five tokens ASSISTANT:"),
                                     max_prompt_tokens=5)
        with pytest.raises(AdapterNotFoundError):
            await engine.add_request(greedy("USER: hi ASSISTANT:", adapter="missing"))
        with pytest.raises(InvalidAdapterError):
            await engine.load_adapter("broken", str(tiny_adapters["r4"].parent / "nowhere"))
    asyncio.run(main())
    assert not engine.submit(lambda e: e.has_unfinished_requests()).result()
    assert engine.health().healthy


def test_unload_is_refused_while_requests_use_the_adapter(engine: AsyncEngine,
                                                          tiny_adapters: dict[str, Path]) -> None:
    async def main() -> None:
        await engine.load_adapter("r4", str(tiny_adapters["r4"]))
        stream = await engine.add_request(greedy("USER: hi ASSISTANT:", 50, adapter="r4"))
        with pytest.raises(InvalidRequestError, match="unfinished"):
            await engine.unload_adapter("r4")
        async for _ in stream:
            pass
        await engine.unload_adapter("r4")
        assert await engine.list_adapters() == []
    asyncio.run(main())


def test_shutdown_fails_in_flight_requests_and_health_reports_it(engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = await engine.add_request(greedy("USER: hi ASSISTANT:", 500))
        await stream.__anext__()  # it is running
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
    asyncio.run(main())
    health = engine.health()
    assert not health.healthy and "stopped" in str(health.reason)
    with pytest.raises(EngineDeadError):
        engine.submit(lambda e: None).result()


def test_failure_messages_keep_their_error_type() -> None:
    assert isinstance(failure_error("r", "InvalidAdapterError: changed on disk"), InvalidAdapterError)
    assert isinstance(failure_error("r", "AdapterNotFoundError: gone"), AdapterNotFoundError)
    for message in ("internal error in step: RuntimeError('x')", "ValoraError: x", "Exception: x",
                    None):
        error = failure_error("r", message)
        assert type(error) is RequestFailedError and error.http_status == 500
