"""Asynchronous scheduling (``SchedulerConfig.async_scheduling``): step N+1 is scheduled and
launched before step N's tokens are read, its decode rows taking their input ids on the device
from step N's sampling (``PENDING_TOKEN`` placeholders in the requests meanwhile).

Against the synchronous engine on the same tiny checkpoint: the same tokens, texts, finish and
stop reasons and logprobs for a mixed batch (greedy and seeded sampling, adapters, an image,
stop strings, stop ids, ``min_tokens``, logprobs, more requests than ``max_num_seqs``) and under
KV pressure that preempts; each call returns the step before's outputs; requests ending by length
run no extra row, those ending by a stop id one (dropped); aborts and failures mid-flight leave
no placeholder in any output; pages, pins and per-request state all come back."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valora import LLM, SamplingParams
from valora.config import SchedulerConfig
from valora.engine.inputs import GenerateRequest
from valora.errors import EngineDeadError, ValoraError
from valora.request import PENDING_TOKEN
from valora.testing.mixed_requests import PROMPTS, logprob_values, mixed_requests, summary


def _llm(tiny_llava: Path, tiny_adapters: dict[str, Path], async_scheduling: bool | None,
         num_pages: int = 96) -> LLM:
    return LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=num_pages,
               page_size=8, max_loras=2, max_lora_rank=64, max_num_seqs=3,
               adapters=tiny_adapters, async_scheduling=async_scheduling)


@pytest.fixture(scope="module")
def pair(tiny_llava: Path, tiny_adapters: dict[str, Path]) -> tuple[LLM, LLM]:
    """The synchronous engine (the CPU's default) and the asynchronous one."""
    sync, async_ = _llm(tiny_llava, tiny_adapters, None), _llm(tiny_llava, tiny_adapters, True)
    assert not sync.engine.async_scheduling and async_.engine.async_scheduling
    assert async_.engine.stats()["async_scheduling"] is True
    return sync, async_


def _assert_clean(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests() and engine._in_flight is None
    assert not engine.requests and not engine.parts.detokenizers
    pool = engine.parts.kv_manager.pool
    assert pool.num_free_pages == pool.num_usable_pages
    assert all(a.pin_count == 0 for a in engine.parts.adapters.list_adapters())
    modes = engine.parts.modes
    assert modes is not None and not modes._last_progress


def test_outputs_equal_the_synchronous_order(pair: tuple[LLM, LLM],
                                             images: list[Image.Image]) -> None:
    sync, overlapped = pair
    requests = mixed_requests(sync, images)
    assert len(requests) > 6
    sync_out, async_out = sync.generate(requests), overlapped.generate(requests)
    expected = [summary(o) for o in sync_out]
    assert [summary(o) for o in async_out] == expected
    for a, b in zip(sync_out, async_out, strict=True):
        assert logprob_values(a) == pytest.approx(logprob_values(b), abs=1e-4)
        assert PENDING_TOKEN not in b.outputs[0].token_ids
    assert any(logprob_values(o) for o in sync_out)
    assert {"stop", "length"} <= {e[2] for e in expected}
    for llm in pair:
        _assert_clean(llm)


def test_under_kv_pressure_the_preempting_schedule_gives_the_same_tokens(
        tiny_llava: Path, tiny_adapters: dict[str, Path]) -> None:
    """Few pages: running requests are preempted (recomputed later) while a token of theirs
    is still pending; the greedy tokens equal the synchronous engine's."""
    outputs, preemptions = [], []
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [f"USER: question {i} about the picture ASSISTANT:" for i in range(3)]
    for flag in (False, True):
        llm = _llm(tiny_llava, tiny_adapters, flag, num_pages=12)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        preemptions.append(llm.engine.num_preemptions)
        _assert_clean(llm)
    assert outputs[0] == outputs[1]
    assert preemptions[1] > 0


def test_each_call_returns_the_step_before_and_length_ends_run_no_extra_row(
        pair: tuple[LLM, LLM]) -> None:
    """One request of 5 tokens: the synchronous engine returns token k from call k; the
    asynchronous one from call k + 1, after the same 5 model steps (the last token's row is
    kept out of the next step: it ends the request by length)."""
    runs = []
    for llm in pair:
        engine = llm.engine
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        rid = engine.add_request(GenerateRequest(prompt=PROMPTS[0], adapter="r8",
                                                 sampling_params=params)).request_id
        per_call: list[list[int]] = []
        steps = engine.num_steps
        while engine.has_unfinished_requests():
            per_call.append([len(o.outputs[0].token_ids) for o in engine.step()
                             if o.request_id == rid])
        runs.append((per_call, engine.num_steps - steps))
        _assert_clean(llm)
    assert runs[0] == ([[1], [2], [3], [4], [5]], 5)
    assert runs[1] == ([[], [1], [2], [3], [4], [5]], 5)


def test_step_seconds_do_not_overlap(pair: tuple[LLM, LLM]) -> None:
    """A step launched before the previous one was read is charged from that read on (the
    device ran the previous step until then): the trace's steps follow one another, so their
    seconds add up to at most the wall time — what the mode policy's calibration learns from."""
    for llm in pair:
        runner = llm.engine.parts.runner
        trace = runner.enable_step_trace()
        start = len(trace)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        llm.generate(PROMPTS[:2], params)
        records = trace[start:]
        assert len(records) >= 6
        for before, after in itertools.pairwise(records):
            assert after.start_s >= before.start_s + before.seconds - 1e-9
        assert all(r.seconds > 0 for r in records)
        runner.step_trace = None
        _assert_clean(llm)


def test_a_stop_id_ends_the_request_after_one_dropped_row(pair: tuple[LLM, LLM]) -> None:
    sync = pair[0]
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    stop_id = sync.generate([PROMPTS[2]], free)[0].outputs[0].token_ids[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                            stop_token_ids=(stop_id,))
    runs = []
    for llm in pair:
        steps = llm.engine.num_steps
        out = llm.generate([PROMPTS[2]], params)[0].outputs[0]
        runs.append((out.token_ids, out.finish_reason, out.stop_reason,
                     llm.engine.num_steps - steps))
        _assert_clean(llm)
    assert runs[0][:3] == runs[1][:3] and runs[0][2] == stop_id
    assert runs[1][3] == runs[0][3] + 1  # the row launched before the stop id was read


def test_abort_mid_flight_leaves_no_placeholder(pair: tuple[LLM, LLM]) -> None:
    """Aborted while a token of its is being sampled: its output holds the tokens read so far
    (the pending one is dropped, as it was never returned), the other request goes on."""
    engine = pair[1].engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    keep = engine.add_request(GenerateRequest(prompt=PROMPTS[0], sampling_params=params))
    gone = engine.add_request(GenerateRequest(prompt=PROMPTS[1], sampling_params=params))
    for _ in range(3):
        engine.step()
    assert gone.output_token_ids[-1] == PENDING_TOKEN
    engine.abort_request(gone.request_id)
    aborted = [o for o in engine.step() if o.request_id == gone.request_id]
    assert aborted[0].outputs[0].finish_reason == "abort"
    assert aborted[0].outputs[0].token_ids == gone.output_token_ids
    assert len(gone.output_token_ids) == 2 and PENDING_TOKEN not in gone.output_token_ids
    while engine.has_unfinished_requests():
        engine.step()
    assert len(keep.output_token_ids) == 8 and PENDING_TOKEN not in keep.output_token_ids
    _assert_clean(pair[1])


@pytest.mark.parametrize("where", ["launch", "finish"])
def test_a_failing_step_fails_its_requests_only(pair: tuple[LLM, LLM], where: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch that raises fails the new step's requests after the step in flight is read and
    delivered; a read that raises (a fault surfacing with the tokens) fails the step in flight's
    requests. No placeholder is left behind; the engine serves the next request."""
    engine = pair[1].engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    request = engine.add_request(GenerateRequest(prompt=PROMPTS[0], sampling_params=params))
    for _ in range(3):
        engine.step()
    target = engine.parts if where == "launch" else engine.parts.runner

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(target, where, broken)
    mine = [o for o in engine.step() if o.request_id == request.request_id]
    monkeypatch.undo()
    reasons = [o.outputs[0].finish_reason for o in mine]
    # launch: the step in flight's token arrives, then the failure; finish: only the failure
    assert reasons == ([None, "error"] if where == "launch" else ["error"])
    assert PENDING_TOKEN not in mine[-1].outputs[0].token_ids
    assert len(mine[-1].outputs[0].token_ids) == (3 if where == "launch" else 2)
    while engine.has_unfinished_requests():
        engine.step()
    again = pair[1].generate([PROMPTS[1]], SamplingParams(max_tokens=3, temperature=0.0,
                                                          ignore_eos=True))
    assert again[0].outputs[0].finish_reason == "length" and engine.is_healthy
    _assert_clean(pair[1])


def test_a_device_fault_read_with_a_step_in_flight_marks_the_engine_dead(
        tiny_llava: Path, tiny_adapters: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA error surfaces when a step's tokens are read, after the next step was launched:
    the requests fail with the device error, nothing stays in flight, the engine is dead."""
    llm = _llm(tiny_llava, tiny_adapters, True)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(GenerateRequest(prompt=p, sampling_params=params)).request_id
           for p in PROMPTS[:2]]
    for _ in range(3):
        engine.step()

    def fault(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.parts.runner, "finish", fault)
    outputs = {o.request_id: o for o in engine.step()}
    assert set(outputs) == set(ids)
    assert all(o.outputs[0].finish_reason == "error" and "device error" in (o.error or "")
               and PENDING_TOKEN not in o.outputs[0].token_ids for o in outputs.values())
    assert not engine.is_healthy and not engine.has_unfinished_requests()
    with pytest.raises(EngineDeadError):
        engine.step()


def test_both_async_modes_at_once_are_refused() -> None:
    with pytest.raises(ValoraError, match="async_scheduling and async_output_processing"):
        SchedulerConfig(async_scheduling=True, async_output_processing=True)


def test_auto_is_on_for_cuda_only() -> None:
    """``async_scheduling=None`` (the default): on for a CUDA engine unless asynchronous output
    processing is asked for, off on the CPU (where nothing overlaps); an explicit value wins."""
    auto = SchedulerConfig()
    assert auto.async_scheduling is None
    assert auto.resolved_async_scheduling("cuda") and not auto.resolved_async_scheduling("cpu")
    outputs = SchedulerConfig(async_output_processing=True)
    assert not outputs.resolved_async_scheduling("cuda")
    assert SchedulerConfig(async_scheduling=True).resolved_async_scheduling("cpu")
    assert not SchedulerConfig(async_scheduling=False).resolved_async_scheduling("cuda")
