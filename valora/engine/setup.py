"""``EngineParts``: the wired-together components of one engine, and how a step runs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from valora.config import EngineConfig
from valora.engine.components import (
    attention_backend_for,
    graph_variants,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    size_kv_cache,
    use_cuda_graphs,
)
from valora.engine.cuda_graph import few_adapter_captures
from valora.engine.detokenizer import IncrementalDetokenizer
from valora.engine.inputs import InputProcessor, ModelLimits
from valora.engine.memory_plan import MemoryPlan, weight_and_slot_bytes
from valora.engine.mode_controller import ModeController, build_switcher, merging_policy
from valora.engine.model_runner import ModelRunner
from valora.engine.policy import get_policy
from valora.engine.scheduler import Scheduler
from valora.engine.scheduler_output import SchedulerOutput
from valora.engine.step_result import LaunchedStep, LoRAStepPlan, StepResult
from valora.engine.vision_graphs import images_per_step
from valora.engine.warm_up import warm_up_base_gemm, warm_up_lora
from valora.errors import InvalidAdapterError, InvalidRequestError, ValoraError
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.kv_cache.page_pool import PagePool
from valora.logger import get_logger
from valora.lora.adapter_manager import AdapterManager
from valora.lora.peft_format import BaseModelShapes
from valora.models.loader import load_model
from valora.multimodal.processor import ImageProcessor
from valora.ops.lora import resolve_lora_backend
from valora.orchestrator.modes import plan_lora_batches
from valora.request import Request

logger = get_logger(__name__)


@dataclass
class EngineParts:
    """Components shared by one engine. Per-request state here is dropped by ``forget``."""

    config: EngineConfig
    model_path: Path
    device: torch.device
    dtype: torch.dtype
    model: Any
    tokenizer: Any
    inputs: InputProcessor
    kv_manager: KVCacheManager
    scheduler: Scheduler
    adapters: AdapterManager
    runner: ModelRunner
    max_model_len: int
    detokenizers: dict[str, IncrementalDetokenizer] = field(default_factory=dict)
    head_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    _heads: dict[tuple[str, str | None], Any] = field(default_factory=dict)
    modes: ModeController | None = None
    admission_failures: list[tuple[Request, Exception]] = field(default_factory=list)
    memory_plan: MemoryPlan | None = None

    # ----- per request ---------------------------------------------------------------------
    def detokenizer_of(self, request: Request) -> IncrementalDetokenizer:
        detok = self.detokenizers.get(request.request_id)
        if detok is None:
            params = request.sampling_params
            detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
            self.detokenizers[request.request_id] = detok
        return detok

    def take_admission_failures(self) -> list[tuple[Request, Exception]]:
        failures = list(self.admission_failures)
        self.admission_failures.clear()  # in place: the scheduler's admit hook appends to this list
        return failures

    def forget(self, request_id: str) -> None:
        if self.modes is not None:
            self.modes.forget(request_id)
        self.detokenizers.pop(request_id, None)
        self.head_results.pop(request_id, None)

    # ----- task heads -------------------------------------------------------------------------
    def head_of(self, adapter_name: str | None, task: str | None = None) -> Any:
        """The task head that answers requests for ``adapter_name`` (and ``task``), or ``None``.

        Raises ``InvalidRequestError`` when a task is named that the adapter has no head for,
        ``InvalidAdapterError`` when its head files are malformed or sized for another model."""
        if adapter_name is None:
            if task is not None:
                raise InvalidRequestError(f"task {task!r} needs an adapter that carries its head")
            return None
        key = (adapter_name, task)
        if key not in self._heads:
            from valora.heads import load_task_head

            head = load_task_head(Path(self.adapters.path_of(adapter_name)), task)
            if head is None and task is not None:
                raise InvalidRequestError(
                    f"adapter {adapter_name!r} has no task head for task {task!r}"
                )
            if head is not None:
                if head.spec.hidden_size != self.model.spec.hidden_size:
                    raise InvalidAdapterError(
                        f"task head of {adapter_name!r} expects hidden size {head.spec.hidden_size}, "
                        f"the model has {self.model.spec.hidden_size}"
                    )
                head = head.to(self.device).eval()
            self._heads[key] = head
        return self._heads[key]

    def head_tokens_of(self, request: Request) -> int:
        head = self.head_of(request.adapter_name, request.task)
        return int(head.num_input_tokens) if head is not None else 0

    def run_head(self, request: Request, hidden: torch.Tensor) -> dict[str, Any]:
        head = self.head_of(request.adapter_name, request.task)
        with torch.inference_mode():
            result = head.run(hidden.to(torch.float32))
        out: dict[str, Any] = result.to_dict()
        out.setdefault("label", result.label)
        return out

    def drop_adapter(self, name: str) -> None:
        for key in [k for k in self._heads if k[0] == name]:
            del self._heads[key]

    # ----- a step -----------------------------------------------------------------------------
    def slot_of(self, request: Request) -> int:
        if request.adapter_name is None:
            return -1
        slot = self.adapters.slot_of(request.adapter_name)
        if slot is None:
            raise RuntimeError(f"adapter {request.adapter_name!r} is scheduled but not resident")
        return int(slot)

    def plan_lora(self, token_slots: list[int]) -> LoRAStepPlan:
        merged_slot = self.modes.merged_slot if self.modes is not None else None
        if merged_slot is None:
            return LoRAStepPlan(token_slots)
        assert self.modes is not None
        lora_slots, correction = plan_lora_batches(
            token_slots, merged_slot, mode=self.modes.mode_for_compute()
        )
        return LoRAStepPlan(lora_slots, correction)

    def execute(
        self,
        scheduled: SchedulerOutput,
        while_device_runs: Callable[[], None] | None = None,
    ) -> StepResult:
        """Run the step and read its tokens (``ModelRunner.launch`` + ``finish``).
        ``while_device_runs`` is called once: in a decode-graph replay, after the step's sampling
        is launched and before the host waits for its tokens, so it overlaps the replay; in any
        other step (eager or piecewise), before the forward is launched — those steps are
        host-bound (launching their kernels takes about as long as running them), so calling it
        after the launch would delay its outputs by the whole step and overlap little (H200
        serving A/B, session 11). Its host time is part of the step's measured seconds."""
        step = self.runner.launch(scheduled.scheduled, *self._step_hooks(),
                                  before_eager=while_device_runs)
        if step.graphed and while_device_runs is not None:
            while_device_runs()
        return self.runner.finish(step)

    def launch(self, scheduled: SchedulerOutput, pending: LaunchedStep | None = None
               ) -> LaunchedStep:
        """``execute``'s first half (``ModelRunner.launch``): the step launched, its tokens not
        read; input tokens pending in its requests come from ``pending``'s sampling."""
        return self.runner.launch(scheduled.scheduled, *self._step_hooks(), pending=pending)

    def _step_hooks(self) -> tuple[Callable[[str], list[int]], Callable[[Request], int],
                                   Callable[[Request], int],
                                   Callable[[list[int]], LoRAStepPlan], Callable[[list[int]], None],
                                   str]:
        """What the runner asks of the engine for a step: page tables, adapter slots, head
        windows, the LoRA plan, the slot-fill wait, and the weights' mode (for the trace)."""
        return (self.kv_manager.page_table, self.slot_of, self.head_tokens_of, self.plan_lora,
                self.adapters.wait_for_slots,
                self.modes.state.mode.value if self.modes is not None else "")

    def stats(self) -> dict[str, Any]:
        pool = self.kv_manager.pool
        return {
            "num_waiting": self.scheduler.num_waiting,
            "num_running": self.scheduler.num_running,
            "kv_pages_total": pool.num_pages - 1,
            "kv_pages_free": pool.num_free_pages,
            "adapters": self.adapters.stats(),
            "image_cache_entries": len(self.runner.image_cache),
            "graph_steps": self.runner.num_graph_steps,
            "eager_steps": self.runner.num_eager_steps,
            "graph_seconds": self.runner.graph_seconds,
            "eager_seconds": self.runner.eager_seconds,
            "graph_rows": self.runner.graph_rows,
            "eager_tokens": self.runner.eager_tokens,
            "piecewise_steps": self.runner.num_piecewise_steps,
            "vision_graph_replays": (self.runner.vision_graphs.num_replays
                                     if self.runner.vision_graphs is not None else 0),
            "modes": self.modes.summary() if self.modes is not None else None,
        }


def build_engine_parts(config: EngineConfig) -> EngineParts:
    """Load the model and build every component (logs where the memory goes)."""
    from transformers import AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.model.dtype, device)
    path = resolve_model_path(config.model.model)
    attention_backend = attention_backend_for(config.model.attention_backend, device)
    model = load_model(
        str(path),
        dtype=dtype,
        device=device,
        load_format=config.model.load_format,
        seed=config.model.seed,
        attention_backend=attention_backend,
    )
    spec = model.spec
    max_model_len = min(
        config.model.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = ImageProcessor.from_pretrained(path) if spec.is_multimodal else None
    limits = ModelLimits(
        max_model_len, spec.image_token_id, spec.num_image_tokens, tuple(spec.eos_token_ids)
    )
    num_slots = config.lora.max_loras if config.lora.enable_lora else 0
    if num_slots:
        model.init_lora(num_slots, config.lora.max_lora_rank, dtype)
        if device.type == "cuda":  # before graph capture: graphs record the overlapped layers
            model.set_lora_overlap(config.lora.overlap_max_tokens)
    lora_backend = resolve_lora_backend(config.lora.lora_backend, device)
    warm_up_lora(config, model, device, lora_backend, num_slots)
    warm_up_base_gemm(config, model, device)
    graphs = use_cuda_graphs(config, device, attention_backend, lora_backend)
    # A merging policy's pristine copy exists before the KV cache is sized (the plan counts it).
    switcher = build_switcher(config, model) if num_slots and merging_policy(config) else None
    sizing = size_kv_cache(
        config,
        model,
        dtype,
        device,
        lora_backend=lora_backend,
        graph_batch=config.scheduler.max_num_seqs if graphs else 0,
        pristine_bytes=switcher.pristine_bytes_on("cuda") if switcher is not None else 0,
    )
    pool = PagePool(sizing.num_pages, config.cache.page_size, config.cache.enable_prefix_caching)
    kv_manager = KVCacheManager(pool)
    adapters = AdapterManager(
        model.lora_slot_map() if num_slots else {},
        config.lora,
        BaseModelShapes.from_config_json(path),
    )

    failures: list[tuple[Request, Exception]] = []

    def admit(request: Request) -> bool:
        if request.adapter_name is None:
            return True
        try:
            return adapters.acquire(request.adapter_name) is not None
        except ValoraError as exc:  # unregistered or unreadable since it was queued
            failures.append((request, exc))
            return False

    def release(request: Request) -> None:
        if request.adapter_name is not None:
            adapters.release(request.adapter_name)

    scheduler = Scheduler(
        config.scheduler,
        config.cache,
        kv_manager,
        max_model_len=max_model_len,
        policy=get_policy(config.scheduler.policy),
        admit=admit,
        release=release,
    )
    runner = ModelRunner(
        model,
        device=device,
        dtype=dtype,
        page_size=config.cache.page_size,
        num_pages=sizing.num_pages,
        num_lora_slots=num_slots,
        lora_backend=lora_backend,
        seed=config.model.seed,
        fuse_correction=config.lora.fuse_correction,
    )
    graph_bytes = 0
    if graphs:
        before = torch.cuda.memory_reserved(device)
        few_buckets, few_max = few_adapter_captures(config.lora, device)
        runner.enable_cuda_graphs(
            config.scheduler.max_num_seqs, max_model_len, graph_variants(config, num_slots),
            few_adapter_buckets=few_buckets, few_adapter_max=few_max,
        )
        if config.model.prefill_graphs:
            runner.enable_piecewise_graphs(config.scheduler.max_num_batched_tokens,
                                           graph_variants(config, num_slots))
        max_images = images_per_step(model, config.scheduler.max_num_batched_tokens)
        if max_images:
            runner.enable_vision_graphs(max_images)
        graph_bytes = torch.cuda.memory_reserved(device) - before
    if device.type == "cuda":
        logger.info("eager path warmed up in %.2f s", runner.warm_up_eager())
    weight_bytes, slot_bytes = weight_and_slot_bytes(model)
    activation_bytes = sizing.plan.activation_peak_bytes if sizing.plan is not None else 0
    pristine = switcher.pristine_bytes_on(device.type) if switcher is not None else 0
    logger.info(
        "model %s on %s (%s, attention %s, %s): weights %.1f MiB, %d adapter slots %.1f MiB, "
        "pristine copy %.1f MiB, activation peak %.1f MiB%s, CUDA graphs %.1f MiB, "
        "KV cache %d pages = %.1f MiB",
        path,
        device,
        dtype,
        attention_backend,
        (f"decode graphs {list(runner.graphs.buckets)}" if runner.graphs else "eager")
        + (f", piecewise graphs {list(runner.piecewise.buckets)}" if runner.piecewise else "")
        + (f", vision graphs {list(runner.vision_graphs.active_buckets)}"
           if runner.vision_graphs else ""),
        weight_bytes / 2**20,
        num_slots,
        slot_bytes / 2**20,
        pristine / 2**20,
        activation_bytes / 2**20,
        "" if sizing.plan is not None else " (not profiled: the KV pages were given)",
        graph_bytes / 2**20,
        sizing.num_pages,
        runner.kv_cache_bytes / 2**20,
    )
    inputs = InputProcessor(tokenizer, image_processor, limits, config.image)
    return EngineParts(
        config=config,
        model_path=path,
        device=device,
        dtype=dtype,
        model=model,
        tokenizer=tokenizer,
        inputs=inputs,
        kv_manager=kv_manager,
        scheduler=scheduler,
        adapters=adapters,
        runner=runner,
        max_model_len=max_model_len,
        admission_failures=failures,
        memory_plan=sizing.plan,
        modes=ModeController(
            config, model, adapters, device, switcher,
            graph_max_rows=runner.graphs.buckets[-1] if runner.graphs else 0,
        ) if num_slots else None,
    )
