"""The GPU execution path's wiring, checked on the CPU: backend/graph choices, the graph-or-eager
dispatch in the runner, adapter slot prefetch tickets and failures, and device faults marking
the engine unhealthy. The GPU itself is exercised in ``tests/gpu/test_engine_cuda.py``."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from valora import LLM, SamplingParams
from valora.config import EngineConfig
from valora.engine.components import (
    attention_backend_for,
    graph_variants,
    size_kv_cache,
    use_cuda_graphs,
)
from valora.engine.faults import (
    DeviceFaultError,
    is_device_fault,
    retain_for_process,
    retained,
)
from valora.errors import EngineDeadError, InvalidRequestError, ValoraError
from valora.forward_batch import ForwardBatch
from valora.layers.attention import available_attention_backends

PROMPT = "USER: What is the answer? ASSISTANT:"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def make_llm(tiny_llava: Path, adapters: dict[str, Path] | None = None, **options: Any) -> LLM:
    return LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=64, page_size=8,
               max_loras=2, max_lora_rank=64, adapters=adapters, **options)


# ----- choices -------------------------------------------------------------------------------
def test_auto_attention_backend_is_triton_on_cuda_only() -> None:
    assert attention_backend_for("auto", CPU) == "torch"
    assert attention_backend_for("torch", CUDA) == "torch"
    if "triton" in available_attention_backends():
        assert attention_backend_for("auto", CUDA) == "triton"


def test_cuda_graphs_only_on_cuda_with_capturable_backends() -> None:
    config = EngineConfig.create()
    assert use_cuda_graphs(config, CUDA, "triton", "triton")
    assert not use_cuda_graphs(config, CPU, "triton", "triton")
    assert not use_cuda_graphs(config, CUDA, "torch", "triton")
    assert not use_cuda_graphs(config, CUDA, "triton", "reference")
    assert use_cuda_graphs(EngineConfig.create(enable_lora=False), CUDA, "triton", "reference")
    assert not use_cuda_graphs(EngineConfig.create(enforce_eager=True), CUDA, "triton", "triton")


def test_graph_variants_follow_lora_and_mode_policy() -> None:
    assert graph_variants(EngineConfig.create(), 0) == ("base",)
    assert graph_variants(EngineConfig.create(), 4) == ("base", "lora")
    assert graph_variants(EngineConfig.create(mode_policy="valora"), 4) == ("base", "lora", "mixed")


def test_cpu_kv_sizing_unchanged(tiny_llava: Path) -> None:
    llm = make_llm(tiny_llava)
    parts = llm.engine.parts
    config = EngineConfig.create(num_pages=None, cpu_cache_bytes=1 << 20)
    sizing = size_kv_cache(config, parts.model, torch.float32, CPU)
    assert sizing.plan is None and sizing.num_pages == max((1 << 20) // sizing.bytes_per_page, 2)
    explicit = size_kv_cache(EngineConfig.create(num_pages=7), parts.model, torch.float32, CPU)
    assert explicit.num_pages == 7 and explicit.plan is None


# ----- graph or eager ------------------------------------------------------------------------
class FakeGraphs:
    """Stands in for ``CudaGraphRunner``: serves text-only decode steps by running the model."""

    def __init__(self, model: Any) -> None:
        self.model, self.runs, self.refused = model, 0, 0

    def can_run(self, batch: ForwardBatch) -> bool:
        ok = batch.num_tokens == batch.attn.num_seqs and batch.image_embeds is None
        self.refused += not ok
        return ok

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        self.runs += 1
        hidden: torch.Tensor = self.model.forward(batch)
        return hidden

    def try_run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """What ``ModelRunner`` calls: ``run`` when ``can_run``, else None."""
        return self.run(batch) if self.can_run(batch) else None


def test_runner_replays_decode_steps_and_runs_the_rest_eagerly(
    tiny_llava: Path, tiny_adapters: dict[str, Path]
) -> None:
    requests = [{"prompt": PROMPT, "adapter": a} for a in (None, "r4", "r16")]
    want = [o.outputs[0].token_ids for o in make_llm(tiny_llava, tiny_adapters).generate(
        requests, GREEDY)]
    llm = make_llm(tiny_llava, tiny_adapters)
    runner = llm.engine.parts.runner
    fake = FakeGraphs(runner.model)
    runner.graphs = fake  # type: ignore[assignment]
    got = [o.outputs[0].token_ids for o in llm.generate(requests, GREEDY)]
    assert got == want
    assert fake.runs == runner.num_graph_steps == GREEDY.max_tokens - 1  # every decode step
    assert fake.refused == runner.num_eager_steps >= 1  # the prefill


def test_graph_capture_unsupported_falls_back_to_eager(tiny_llava: Path) -> None:
    llm = make_llm(tiny_llava)
    runner = llm.engine.parts.runner
    assert runner.graphs is None  # CPU: never captured
    assert not runner.enable_cuda_graphs(4, 256)  # torch attention is not capturable
    assert runner.graphs is None
    out = llm.generate(PROMPT, GREEDY)[0]
    assert out.error is None and len(out.outputs[0].token_ids) == GREEDY.max_tokens


# ----- adapter slot prefetch -----------------------------------------------------------------
def test_slot_writes_leave_tickets_that_a_step_consumes(
    tiny_llava: Path, tiny_adapters: dict[str, Path]
) -> None:
    llm = make_llm(tiny_llava, tiny_adapters)
    adapters = llm.engine.parts.adapters
    waited: list[list[int]] = []
    original = adapters.wait_for_slots

    def record(slots: Any) -> None:
        waited.append(sorted(slots))
        original(slots)

    adapters.wait_for_slots = record  # type: ignore[method-assign]
    llm.generate([{"prompt": PROMPT, "adapter": "r4"}, {"prompt": PROMPT}], GREEDY)
    slot = adapters.slot_of("r4")
    assert slot is not None and waited and all(w == [slot] for w in waited)
    assert adapters.pending_slot_writes() == [] and slot not in adapters._writer._tickets
    adapters.check_invariants()


def test_pinning_failure_fails_only_that_request(
    tiny_llava: Path, tiny_adapters: dict[str, Path]
) -> None:
    llm = make_llm(tiny_llava, tiny_adapters)
    prefetcher = llm.engine.parts.adapters._writer._prefetcher
    assert prefetcher is not None

    def failing_pin(tensor: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cudaHostAlloc failed: injected")

    prefetcher.pin = failing_pin  # type: ignore[method-assign]
    bad, good = llm.generate([{"prompt": PROMPT, "adapter": "r4"}, {"prompt": PROMPT}], GREEDY)
    assert "AdapterPrefetchError" in (bad.error or "") and "injected" in (bad.error or "")
    assert good.error is None and llm.engine.is_healthy
    llm.engine.parts.adapters.check_invariants()


def test_prefetch_failure_fails_only_that_request(
    tiny_llava: Path, tiny_adapters: dict[str, Path]
) -> None:
    llm = make_llm(tiny_llava, tiny_adapters)
    adapters = llm.engine.parts.adapters
    prefetcher = adapters._writer._prefetcher
    assert prefetcher is not None

    def failing_submit(*args: Any, **kwargs: Any) -> Any:
        raise ValoraError("adapter slot prefetch failed: injected copy failure")

    prefetcher.submit = failing_submit  # type: ignore[method-assign]
    bad, good = llm.generate([{"prompt": PROMPT, "adapter": "r16"}, {"prompt": PROMPT}], GREEDY)
    assert bad.finished and bad.error is not None
    assert "AdapterPrefetchError" in bad.error and "r16" in bad.error
    assert "injected copy failure" in bad.error
    assert good.error is None and len(good.outputs[0].token_ids) == GREEDY.max_tokens
    assert adapters.slot_of("r16") is None and llm.engine.is_healthy
    adapters.check_invariants()
    del prefetcher.submit  # the instance attribute; the class method serves again
    again = llm.generate({"prompt": PROMPT, "adapter": "r16"}, GREEDY)[0]
    assert again.error is None and adapters.slot_of("r16") is not None


# ----- device faults -------------------------------------------------------------------------
def test_device_fault_classification() -> None:
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling gemm"))
    assert is_device_fault(DeviceFaultError("lost the device"))
    assert not is_device_fault(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_device_fault(InvalidRequestError("CUDA error in the prompt text"))
    assert not is_device_fault(ValueError("CUDA error"))


def _inject(llm: LLM, exc: Exception) -> None:
    runner = llm.engine.parts.runner

    def broken(batch: ForwardBatch, before_eager: object = None) -> torch.Tensor:
        raise exc

    runner._forward = broken  # type: ignore[method-assign]


def test_cuda_error_in_a_step_fails_its_requests_and_marks_the_engine_unhealthy(
    tiny_llava: Path,
) -> None:
    llm = make_llm(tiny_llava)
    _inject(llm, RuntimeError("CUDA error: an illegal memory access was encountered"))
    outputs = llm.generate([PROMPT, PROMPT], GREEDY)
    assert all(o.outputs[0].finish_reason == "error" and o.error is not None for o in outputs)
    assert all("device error" in (o.error or "") for o in outputs)
    engine = llm.engine
    assert not engine.is_healthy and "illegal memory access" in (engine.dead_reason or "")
    with pytest.raises(EngineDeadError):
        llm.generate(PROMPT, GREEDY)
    # kept for the life of the process: nothing of it is freed against a dead context
    assert any(kept is engine for kept in retained())


def test_a_retained_object_outlives_its_last_reference() -> None:
    class Holder:
        pass

    kept, dropped = Holder(), Holder()
    kept_ref, dropped_ref = weakref.ref(kept), weakref.ref(dropped)
    retain_for_process(kept)
    del kept, dropped
    gc.collect()
    assert kept_ref() is not None and dropped_ref() is None


def test_other_step_errors_fail_the_step_but_keep_the_engine(tiny_llava: Path) -> None:
    llm = make_llm(tiny_llava)
    _inject(llm, RuntimeError("shape mismatch in a kernel"))
    failed = llm.generate(PROMPT, GREEDY)[0]
    assert failed.outputs[0].finish_reason == "error" and "internal error" in (failed.error or "")
    assert llm.engine.is_healthy and not any(kept is llm.engine for kept in retained())
    del llm.engine.parts.runner._forward
    ok = llm.generate(PROMPT, GREEDY)[0]
    assert ok.error is None and len(ok.outputs[0].token_ids) == GREEDY.max_tokens
