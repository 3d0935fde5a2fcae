"""Mode policies on CUDA under asynchronous scheduling (the CUDA default): weight switches
(merge / unmerge in place) happen while the step before is still in flight, stream-ordered after
it, and decode graphs replay over merged weights and the mixed-mode correction. Every policy must
give each request the greedy tokens of the CPU's plain unmerged serving (fp32), and the merging
ones must really switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from valora import LLM, SamplingParams
from valora.orchestrator import policies
from valora.testing.policies import AlwaysMixed

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
ADAPTERS = ["r16", "r16", "r4", "r16", None, "r16", "r8", "r16", "r4", "r16"]


@pytest.fixture(autouse=True)
def _always_mixed_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies._REGISTRY, AlwaysMixed.name, AlwaysMixed)


def _requests() -> list[dict[str, Any]]:
    rng = np.random.default_rng(9)
    image = Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8"))
    out = []
    for i, adapter in enumerate(ADAPTERS):
        with_image = i % 3 == 0
        prompt = ("USER: <image>\nWhat is it? ASSISTANT:" if with_image
                  else f"USER: question {i} ASSISTANT:")
        out.append({"prompt": prompt, "images": [image] if with_image else [],
                    "adapter": adapter, "sampling_params": PARAMS})
    return out


def _llm(model: Path, adapters: dict[str, Path], device: str, policy: str) -> LLM:
    return LLM(model=str(model), dtype="float32", device=device, num_pages=256, page_size=16,
               max_loras=4, max_lora_rank=16, max_num_seqs=8, adapters=adapters,
               mode_policy=policy, starvation_s=0.5, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def reference(tiny_llava: Path, adapters: dict[str, Path]) -> list[Any]:
    return _llm(tiny_llava, adapters, "cpu", "unmerged-fcfs").generate(_requests())


@pytest.mark.parametrize("policy", [AlwaysMixed.name, "merged-only", "dlora", "valora"])
def test_policy_on_cuda_gives_the_cpu_unmerged_tokens(policy: str, tiny_llava: Path,
                                                      adapters: dict[str, Path],
                                                      reference: list[Any]) -> None:
    torch.cuda.empty_cache()
    llm = _llm(tiny_llava, adapters, "cuda", policy)
    engine = llm.engine
    assert engine.async_scheduling and engine.parts.runner.graphs is not None
    outputs = llm.generate(_requests())
    for got, want in zip(outputs, reference, strict=True):
        assert got.error is None, got.error
        assert got.outputs[0].token_ids == want.outputs[0].token_ids, policy
        for a, b in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 2e-3 * max(1.0, abs(b.logprob))
    summary = engine.stats()["modes"]
    if policy in (AlwaysMixed.name, "merged-only"):
        assert summary["num_switches"] >= 1, summary
    if policy == AlwaysMixed.name:
        assert summary["steps_by_mode"].get("mixed", 0) > 0, summary
    assert engine.parts.runner.num_graph_steps > 0
    assert not engine.has_unfinished_requests()
