"""The engine with piecewise graphs (``valora.engine.piecewise_graphs``) in their eager mode on
the CPU: the same tokens and log-probabilities as plain eager steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valora import LLM, SamplingParams


@pytest.mark.parametrize("policy", ["unmerged-fcfs", "merged-only"])
def test_engine_outputs_are_unchanged_with_piecewise_pieces(
        tiny_llava: Path, tiny_adapters: dict[str, Path], images: list[Image.Image],
        policy: str) -> None:
    """The engine's steps through the pieces (eager mode: prefill chunks with image rows,
    decodes, adapters; under ``merged-only`` the base rows' correction, the ``mixed`` variant)
    give the tokens and log-probabilities of its plain eager steps."""
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=1)
    adapters = ["r16", None, "r4", "r16", "r8"]
    workload = [{"prompt": "USER: <image>\nWhat is it? ASSISTANT:" if i % 2 == 0
                 else f"USER: question {i} ASSISTANT:", "images": images[:1] if i % 2 == 0
                 else [], "adapter": adapter, "sampling_params": params}
                for i, adapter in enumerate(adapters)]

    def run(piecewise: bool) -> list[Any]:
        llm = LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=256,
                  page_size=8, max_loras=4, max_lora_rank=64, adapters=tiny_adapters,
                  mode_policy=policy, enable_prefix_caching=False, max_num_batched_tokens=64)
        runner = llm.engine.parts.runner
        if piecewise:
            assert runner.enable_piecewise_graphs(64, ("base", "lora", "mixed"),
                                                  use_graphs=False)
        outputs = llm.generate(workload)
        if piecewise:
            assert runner.num_piecewise_steps == runner.num_eager_steps > 0
        return outputs

    for got, want in zip(run(True), run(False), strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-4 * max(1.0, abs(b.logprob))


def test_eager_warm_up_leaves_counters_and_outputs_alone(tiny_llava: Path) -> None:
    """``ModelRunner.warm_up_eager`` (run at engine start on a GPU) goes through the pieces and
    the eager attention on free pages, leaves the step counters as they were and changes no
    output: the KV pages it wrote are overwritten before any request reads them."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = [f"USER: question {i} about the picture ASSISTANT:" for i in range(3)]

    def run(warm: bool) -> list[Any]:
        llm = LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=64,
                  page_size=8, enable_prefix_caching=False, max_num_batched_tokens=64)
        runner = llm.engine.parts.runner
        assert runner.enable_piecewise_graphs(64, ("base",), use_graphs=False)
        if warm:
            assert runner.warm_up_eager(17) > 0
            assert runner.warm_up_eager(8 * 64) == 0.0  # more pages than the cache: skipped
            assert (runner.num_eager_steps, runner.num_graph_steps,
                    runner.num_piecewise_steps) == (0, 0, 0)
        return llm.generate(prompts, params)

    for got, want in zip(run(True), run(False), strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-6 * max(1.0, abs(b.logprob))
