"""Modes are optimisations, never semantics: every mode policy gives each request the tokens (and,
within 1e-4, the logprobs) of plain unmerged serving, while really switching weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valora import LLM, SamplingParams
from valora.layers import lora_overlap
from valora.orchestrator import policies
from valora.orchestrator.modes import Mode
from valora.testing.policies import AlwaysMixed


@pytest.fixture(autouse=True)
def _always_mixed_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered only for this module's tests (the registry is process-wide)."""
    monkeypatch.setitem(policies._REGISTRY, "test-always-mixed", AlwaysMixed)

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


def _workload(images: list[Image.Image]) -> list[dict[str, Any]]:
    adapters = ["r16", "r16", "r4", "r16", None, "r16", "r8", "r16"]
    out = []
    for i, adapter in enumerate(adapters):
        prompt = "USER: <image>\nWhat is it? ASSISTANT:" if i % 3 == 0 else f"USER: question {i} ASSISTANT:"
        imgs = images[:1] if i % 3 == 0 else []
        out.append({"prompt": prompt, "images": imgs, "adapter": adapter, "sampling_params": PARAMS})
    return out


def _run(model: Path, adapters: dict[str, Path], policy: str, images: list[Image.Image],
         **options: Any) -> tuple[list[Any], LLM]:
    llm = LLM(model=str(model), dtype="float32", device="cpu", num_pages=256, page_size=8, max_loras=4,
              max_lora_rank=64, adapters=adapters, mode_policy=policy, starvation_s=0.5,
              enable_prefix_caching=False, **options)
    return llm.generate(_workload(images)), llm


def _assert_matches(outputs: list[Any], unmerged: list[Any]) -> None:
    """Each request's tokens equal unmerged serving's, its logprobs within 1e-4 (relative)."""
    for got, ref in zip(outputs, unmerged, strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-4 * max(1.0, abs(b.logprob))


@pytest.fixture(scope="module")
def unmerged(tiny_llava: Path, tiny_adapters: dict[str, Path], images: list[Image.Image]) -> list[Any]:
    return _run(tiny_llava, tiny_adapters, "unmerged-fcfs", images)[0]


@pytest.mark.parametrize("policy", ["test-always-mixed", "merged-only", "dlora", "valora"])
def test_policy_matches_unmerged(policy: str, tiny_llava: Path, tiny_adapters: dict[str, Path],
                                 images: list[Image.Image], unmerged: list[Any]) -> None:
    outputs, llm = _run(tiny_llava, tiny_adapters, policy, images)
    _assert_matches(outputs, unmerged)
    summary = llm.engine.stats()["modes"]
    if policy in ("test-always-mixed", "merged-only"):
        assert summary["num_switches"] >= 1, summary
    if policy == "valora":  # the cost model charges steps as this engine runs them: eager
        modes = llm.engine.parts.modes
        assert modes is not None and modes.policy.cost_model.graph_max_rows == 0  # type: ignore[attr-defined]
        # Every executed step reached the calibration (all eager here), and it now scales the
        # plan by what they measured against the (analytic) model.
        scales = summary["cost_scales"]
        assert scales["observed"] == [llm.engine.num_steps, 0], scales
        assert scales["graph"] == 1.0 and scales["eager"] > 0
        assert modes.policy.planning_model.eager_scale == scales["eager"]  # type: ignore[attr-defined]
    else:
        assert summary["cost_scales"] is None
    # Every merging policy takes its pristine copy at start-up (before the KV cache is sized).
    assert summary["pristine_bytes"] > 0, summary


@pytest.mark.parametrize("policy", ["test-always-mixed", "merged-only", "dlora", "valora"])
def test_async_scheduling_matches_unmerged(policy: str, tiny_llava: Path,
                                           tiny_adapters: dict[str, Path],
                                           images: list[Image.Image],
                                           unmerged: list[Any]) -> None:
    """``async_scheduling``: the mode decision and weight switch for step N+1 happen while step
    N is in flight (stream-ordered after it); every request still gets unmerged serving's
    tokens and logprobs, and the merging policies really switch."""
    outputs, llm = _run(tiny_llava, tiny_adapters, policy, images, async_scheduling=True)
    _assert_matches(outputs, unmerged)
    summary = llm.engine.stats()["modes"]
    if policy in ("test-always-mixed", "merged-only"):
        assert summary["num_switches"] >= 1, summary
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("policy", ["test-always-mixed", "valora"])
def test_fused_correction_matches_unmerged(policy: str, tiny_llava: Path,
                                           tiny_adapters: dict[str, Path],
                                           images: list[Image.Image],
                                           unmerged: list[Any]) -> None:
    """``fuse_correction``: mixed-mode steps carry one LoRA batch with the correction inside."""
    outputs, llm = _run(tiny_llava, tiny_adapters, policy, images, fuse_correction=True)
    assert llm.engine.parts.runner.fuse_correction
    _assert_matches(outputs, unmerged)
    if policy == "test-always-mixed":
        assert llm.engine.stats()["modes"]["steps_by_mode"].get("mixed", 0) > 0


def test_unmerge_restores_base_weights_exactly(tiny_llava: Path, tiny_adapters: dict[str, Path],
                                               images: list[Image.Image]) -> None:
    _, llm = _run(tiny_llava, tiny_adapters, "test-always-mixed", images)
    modes = llm.engine.parts.modes
    assert modes is not None and modes.switcher is not None and modes.state.merged_adapter == "r16"
    modes.switcher.unmerge()
    for key, weight in llm.engine.parts.model.lora_base_weights().items():
        if key in llm.engine.parts.model.lora_slot_map():
            assert (weight == modes.switcher.pristine(key)).all(), key


def test_set_mode_policy_unmerges_then_serves_like_unmerged(
        tiny_llava: Path, tiny_adapters: dict[str, Path], images: list[Image.Image],
        unmerged: list[Any]) -> None:
    """Benchmarks swap policies on one engine: the swap restores the base weights exactly, the
    next policy's outputs are plain unmerged serving's, and caches can be emptied in between."""
    _, llm = _run(tiny_llava, tiny_adapters, "test-always-mixed", images)
    engine = llm.engine
    modes = engine.parts.modes
    assert modes is not None and modes.switcher is not None and modes.state.merged_adapter == "r16"
    assert engine.parts.runner.image_cache.nbytes > 0
    engine.set_mode_policy("unmerged-fcfs")
    assert modes.state.merged_adapter is None and modes.state.mode is Mode.UNMERGED
    assert modes.summary()["policy"] == "unmerged-fcfs"
    for key, weight in engine.parts.model.lora_base_weights().items():
        if key in engine.parts.model.lora_slot_map():
            assert (weight == modes.switcher.pristine(key)).all(), key
    engine.reset_caches()
    assert len(engine.parts.runner.image_cache) == 0
    switches = modes.stats.num_switches
    outputs = llm.generate(_workload(images))
    assert modes.stats.num_switches == switches  # unmerged-fcfs never merges
    for got, ref in zip(outputs, unmerged, strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
    engine.set_mode_policy("dlora")
    assert modes.summary()["policy"] == "dlora"


def test_set_mode_policy_refuses_what_the_engine_cannot_do(
        tiny_llava: Path, tiny_adapters: dict[str, Path]) -> None:
    from valora.engine.inputs import GenerateRequest
    from valora.errors import InvalidRequestError

    llm = LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=64, page_size=8,
              max_loras=2, adapters=tiny_adapters, mode_policy="unmerged-fcfs")
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="start it with a merging policy"):
        engine.set_mode_policy("valora")
    with pytest.raises(InvalidRequestError, match="unknown mode policy"):
        engine.set_mode_policy("fifo")
    engine.add_request(GenerateRequest(prompt="USER: hi ASSISTANT:", adapter="r8",
                                       sampling_params=PARAMS))
    with pytest.raises(InvalidRequestError, match="unfinished"):
        engine.set_mode_policy("unmerged-fcfs")
    with pytest.raises(InvalidRequestError, match="unfinished"):
        engine.reset_caches()


@pytest.mark.parametrize("policy", ["unmerged-fcfs", "test-always-mixed"])
def test_lora_delta_fold_matches_unmerged(policy: str, tiny_llava: Path,
                                          tiny_adapters: dict[str, Path],
                                          images: list[Image.Image], unmerged: list[Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA deltas folded into the next ops (``set_lora_delta_fold``; on the CPU the o /
    down deltas go into the residual): the same tokens and logprobs, in unmerged and mixed mode; the requests that share
    an image read its cached embeddings after the first one ran (never written into)."""
    monkeypatch.setattr(lora_overlap, "_DELTA_FOLD", [True])
    outputs, _ = _run(tiny_llava, tiny_adapters, policy, images)
    _assert_matches(outputs, unmerged)
