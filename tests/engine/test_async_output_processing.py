"""Asynchronous output processing (``SchedulerConfig.async_output_processing``): the same tokens,
texts, finish and stop reasons and logprobs as the synchronous order for a mixed batch (greedy
and seeded sampling, adapters, images, stop strings hit mid-output and on the last allowed
token, stop token ids, ``min_tokens``, logprobs, more requests than ``max_num_seqs``); first and
final outputs at once, those in between one step later; the deferred half runs inside the next step's ``execute`` (before the tokens are
read back); aborts see every token's text; a failing step still delivers the previous step's
outputs; pages and adapter pins all come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valora import LLM, SamplingParams
from valora.engine.inputs import GenerateRequest
from valora.outputs import RequestOutput
from valora.testing.mixed_requests import PROMPTS, logprob_values, mixed_requests, summary


def _llm(tiny_llava: Path, tiny_adapters: dict[str, Path], async_outputs: bool) -> LLM:
    return LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=96, page_size=8,
               max_loras=2, max_lora_rank=64, max_num_seqs=3, adapters=tiny_adapters,
               async_output_processing=async_outputs)


@pytest.fixture(scope="module")
def pair(tiny_llava: Path, tiny_adapters: dict[str, Path]) -> tuple[LLM, LLM]:
    return (_llm(tiny_llava, tiny_adapters, False), _llm(tiny_llava, tiny_adapters, True))


def test_outputs_equal_the_synchronous_order(pair: tuple[LLM, LLM],
                                             images: list[Image.Image]) -> None:
    sync, overlapped = pair
    requests = mixed_requests(sync, images)
    assert len(requests) > 6  # at least one stop-string request of each kind
    sync_out, async_out = sync.generate(requests), overlapped.generate(requests)
    expected = [summary(o) for o in sync_out]
    got = [summary(o) for o in async_out]
    assert got == expected
    for a, b in zip(sync_out, async_out, strict=True):
        assert logprob_values(a) == pytest.approx(logprob_values(b), abs=1e-4)
    assert any(logprob_values(o) for o in sync_out)
    for llm in pair:  # no per-request state left behind (stop strings retire mid-step here)
        modes = llm.engine.parts.modes
        assert modes is not None and not modes._last_progress
        assert not llm.engine.requests and not llm.engine.parts.detokenizers
    reasons = {e[2] for e in expected}
    assert {"stop", "length"} <= reasons
    assert any(isinstance(e[3], str) for e in expected)  # a stop string ended one


def test_first_and_final_outputs_come_at_once_and_resources_return(
        pair: tuple[LLM, LLM]) -> None:
    """Each ``step()`` call's outputs for one request: synchronous — one token more each call;
    asynchronous — the first token at once, tokens 2–4 one call late (two arrive together when
    the final one is not deferred), and no extra call at the end."""
    counts, arrivals = [], []
    for llm in pair:
        engine = llm.engine
        pool = engine.parts.kv_manager.pool
        free = pool.num_free_pages
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        rid = engine.add_request(GenerateRequest(prompt=PROMPTS[0], adapter="r8",
                                                 sampling_params=params)).request_id
        seen: list[list[int]] = []
        per_call: list[list[int]] = []
        model_steps, calls = engine.num_steps, 0
        while engine.has_unfinished_requests():
            mine = [len(o.outputs[0].token_ids) for o in engine.step() if o.request_id == rid]
            seen += mine
            per_call.append(mine)
            calls += 1
        counts.append((engine.num_steps - model_steps, calls))
        arrivals.append(per_call)
        assert seen == [1, 2, 3, 4, 5]
        assert pool.num_free_pages == free
        assert all(a.pin_count == 0 for a in engine.parts.adapters.list_adapters())
    assert counts[1] == counts[0]  # the same model steps and calls
    assert arrivals[0] == [[1], [2], [3], [4], [5]]
    assert arrivals[1] == [[1], [], [2], [3], [4, 5]]


def test_deferred_half_runs_inside_the_next_step(pair: tuple[LLM, LLM],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine = pair[1].engine
    calls: list[bool] = []
    real = engine.parts.execute

    def spy(scheduled: Any, *rest: Any) -> Any:
        calls.append(bool(rest) and rest[0] is not None)
        return real(scheduled, *rest)

    monkeypatch.setattr(engine.parts, "execute", spy)
    pair[1].generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0.0,
                                                  ignore_eos=True))
    # steps 1 and 2 have nothing deferred before them (the first token is not deferred)
    assert calls == [False, False, True, True]


def test_abort_sees_every_token(pair: tuple[LLM, LLM]) -> None:
    """Aborted after three steps: the same tokens and text in both orders (the pending deferred
    half runs before the abort's output is built)."""
    results = []
    for llm in pair:
        engine = llm.engine
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        engine.add_request(GenerateRequest(prompt=PROMPTS[0], sampling_params=params))
        gone = engine.add_request(GenerateRequest(prompt=PROMPTS[1], sampling_params=params))
        for _ in range(3):
            engine.step()
        engine.abort_request(gone.request_id)
        aborted = [o for o in engine.step() if o.request_id == gone.request_id]
        while engine.has_unfinished_requests():
            engine.step()
        assert aborted[-1].outputs[0].finish_reason == "abort"
        results.append((aborted[-1].outputs[0].token_ids, aborted[-1].outputs[0].text))
    assert results[0] == results[1] and len(results[0][0]) == 3


def test_a_failing_step_still_delivers_the_previous_steps_outputs(
        pair: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = pair[1].engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    keep = engine.add_request(GenerateRequest(prompt=PROMPTS[0], sampling_params=params))
    for _ in range(3):
        engine.step()
    before = len(keep.output_token_ids)

    def broken(*args: Any) -> Any:
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine.parts, "execute", broken)
    mine = [o for o in engine.step() if o.request_id == keep.request_id]
    # the previous step's token (its deferred half) arrives, then the failure ends the request
    assert [o.outputs[0].finish_reason for o in mine] == [None, "error"]
    assert len(mine[0].outputs[0].token_ids) == before == 3
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    engine.step()  # the failure count resets on the next good step


def test_an_eager_step_runs_the_deferred_half_before_its_forward(
        pair: tuple[LLM, LLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a decode-graph replay (every step on the CPU): the deferred half runs before the
    step's forward is launched, not after its sampling — an eager step's host time is the step."""
    engine = pair[1].engine
    events: list[str] = []
    model = engine.parts.runner.model
    real_forward, real_deferred = model.forward, engine._run_deferred

    def forward(batch: Any) -> Any:
        events.append("forward")
        return real_forward(batch)

    def deferred() -> list[RequestOutput]:
        built = real_deferred()
        if built:
            events.append("deferred")
        return built

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(engine, "_run_deferred", deferred)
    pair[1].generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0,
                                                  ignore_eos=True))
    # token 1 at once, token 2 deferred into step 3, token 3 (the last) at once
    assert events == ["forward", "forward", "deferred", "forward"]


def test_the_output_sink_receives_outputs_mid_step_in_order(pair: tuple[LLM, LLM]) -> None:
    """With ``output_sink`` set, the deferred half's outputs leave inside the next step (before
    its forward here); sink and return value together carry every output of the synchronous
    order, each request's in order, none twice; without a deferred half the sink stays unused."""
    results = []
    for llm in pair:
        engine = llm.engine
        received: list[tuple[str, str, int, bool]] = []

        def sink(outputs: list[RequestOutput],
                 received: list[tuple[str, str, int, bool]] = received) -> None:
            received.extend(("sink", o.request_id, len(o.outputs[0].token_ids), o.finished)
                            for o in outputs)

        engine.output_sink = sink
        try:
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            for prompt in PROMPTS[:2]:
                engine.add_request(GenerateRequest(prompt=prompt, sampling_params=params))
            while engine.has_unfinished_requests():
                received.extend(("return", o.request_id, len(o.outputs[0].token_ids), o.finished)
                                for o in engine.step())
        finally:
            engine.output_sink = None
        results.append(received)
    sync, asynchronous = results
    assert {kind for kind, *_ in sync} == {"return"}
    assert sum(kind == "sink" for kind, *_ in asynchronous) == 4  # tokens 2 and 3 of each
    for outputs in (sync, asynchronous):
        by_request: dict[str, list[tuple[int, bool]]] = {}
        for _, rid, count, finished in outputs:
            by_request.setdefault(rid, []).append((count, finished))
        assert len(by_request) == 2
        for seen in by_request.values():
            assert seen == [(1, False), (2, False), (3, False), (4, True)]
