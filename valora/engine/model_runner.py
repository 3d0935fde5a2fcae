"""Run one scheduled step: build the batch, place image embeddings, run the model, sample.

The runner owns the device state of a step: KV cache tensors, the image-embedding cache, the
per-request random generators, partial hidden states collected for task heads and, on CUDA with
the Triton attention backend, a ``CudaGraphRunner`` that replays decode steps.

Graph use: ``enable_cuda_graphs`` (called once the KV caches are bound, i.e. right after
construction) captures decode graphs over batch-size buckets, ``enable_piecewise_graphs`` the
row-wise pieces of other steps over token-count buckets; ``launch`` runs a step through
``graphs.run`` when ``graphs.can_run(batch)`` (every sequence decodes one token, no image rows,
a captured bucket and LoRA variant exist), else through ``piecewise.run`` when that can serve
it (pieces replayed around eager attention), else eagerly through ``model.forward``. All paths
compute the same function; LoRA metadata reaches the graphs through static buffers, so a change
of adapters never recaptures. ``num_graph_steps`` / ``num_eager_steps`` count decode-graph and
other steps (``num_piecewise_steps`` the latter's piecewise replays).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from valora.engine.batch_builder import (
    ImageRows,
    build_forward_batch,
    fill_pending_tokens,
    upload_ints,
)
from valora.engine.cuda_graph import CudaGraphRunner, capture_decode_graphs
from valora.engine.image_cache import ImageEmbeddingCache, step_image_embeddings
from valora.engine.memory_plan import profiling_batch
from valora.engine.piecewise_graphs import PiecewiseGraphRunner, capture_piecewise_graphs
from valora.engine.sampler import SamplingRow, launch_sample, make_generator
from valora.engine.scheduler_output import ScheduledRequest
from valora.engine.step_result import LaunchedStep, LoRAStepPlan, StepResult
from valora.engine.step_trace import StepRecord, lora_ops
from valora.engine.vision_graphs import VisionGraphRunner
from valora.forward_batch import ForwardBatch
from valora.logger import get_logger
from valora.ops.lora import LoRABatch, prepare_lora_batch
from valora.request import Request

logger = get_logger(__name__)


class ModelRunner:
    """Executes steps of one model on one device."""

    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        page_size: int,
        num_pages: int,
        num_lora_slots: int,
        lora_backend: str,
        image_cache_bytes: int = 256 * 1024 * 1024,
        seed: int = 0,
        fuse_correction: bool = False,
    ) -> None:
        """``fuse_correction``: mixed-mode steps carry one LoRA batch with the correction inside
        (``LoRAConfig.fuse_correction``), else a second batch for it."""
        self.model = model
        self.fuse_correction = fuse_correction
        self.device = device
        self.dtype = dtype
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_lora_slots = num_lora_slots
        self.lora_backend = lora_backend
        self.seed = seed
        shape = model.kv_cache_shape(num_pages, page_size)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(model.spec.num_layers)
        ]
        model.bind_kv_caches(self.kv_caches)
        self.image_cache = ImageEmbeddingCache(image_cache_bytes)
        self._generators: dict[str, torch.Generator | None] = {}
        self._head_hidden: dict[str, list[torch.Tensor]] = {}
        self._num_generated_seeds = 0
        self.graphs: CudaGraphRunner | None = None
        self.piecewise: PiecewiseGraphRunner | None = None
        """Piecewise graphs of non-decode steps (``enable_piecewise_graphs``); None = eager."""
        self.vision_graphs: VisionGraphRunner | None = None
        """Graph replays of the vision tower (``enable_vision_graphs``); None = eager."""
        self.num_graph_steps = 0
        self.num_eager_steps = 0
        self.graph_seconds = 0.0
        self._last_finish = 0.0  # perf_counter() when the last step's tokens were read
        self.eager_seconds = 0.0
        self.eager_tokens = 0
        self.graph_rows = 0
        self.step_trace: list[StepRecord] | None = None
        """Per-step records while enabled (``enable_step_trace``); None = off."""
        self._trace_limit = 100_000

    def enable_cuda_graphs(
        self, max_batch: int, max_context: int, variants: Sequence[str] = ("base", "lora"),
        few_adapter_buckets: Sequence[int] = (), few_adapter_max: int = 0,
    ) -> bool:
        """Capture decode graphs for up to ``max_batch`` sequences of ``max_context`` tokens
        (``few_adapter_*``: ``CudaGraphRunner``'s few-adapter captures).

        Returns whether graphs are in use. A model the graph runner cannot serve (an attention
        backend that is not capturable, length-dependent RoPE) keeps running eagerly, with a
        warning. Must be called after the KV caches are bound and ``init_lora`` ran (both keep
        their storage afterwards)."""
        self.graphs = capture_decode_graphs(
            self.model,
            max_batch,
            max_context=max_context,
            page_size=self.page_size,
            num_lora_slots=self.num_lora_slots,
            variants=variants,
            fuse_correction=self.fuse_correction,
            few_adapter_buckets=few_adapter_buckets,
            few_adapter_max=few_adapter_max,
        )
        return self.graphs is not None

    def enable_piecewise_graphs(
        self, max_tokens: int, variants: Sequence[str] = ("base", "lora"),
        use_graphs: bool | None = None,
    ) -> bool:
        """Capture the row-wise pieces of steps of up to ``max_tokens`` tokens
        (``valora.engine.piecewise_graphs``); returns whether they are in use. Same ordering
        constraints as ``enable_cuda_graphs``. ``use_graphs=False`` runs the pieces eagerly
        (tests on the CPU)."""
        self.piecewise = capture_piecewise_graphs(
            self.model, max_tokens, num_lora_slots=self.num_lora_slots, variants=variants,
            fuse_correction=self.fuse_correction, use_graphs=use_graphs)
        return self.piecewise is not None

    def enable_vision_graphs(self, max_images: int, use_graphs: bool | None = None) -> bool:
        """Capture the vision tower for up to ``max_images`` images a step
        (``valora.engine.vision_graphs``); False (eager) for a model without one or where no
        bucket could be captured."""
        if getattr(self.model, "vision_tower", None) is None:
            return False
        runner = VisionGraphRunner(self.model, max_images, use_graphs=use_graphs)
        runner.capture()
        self.vision_graphs = runner if runner.active_buckets else None
        return self.vision_graphs is not None

    @torch.inference_mode()
    def warm_up_eager(self, num_tokens: int = 17) -> float:
        """Run one eager prefill step of ``num_tokens`` tokens (one sequence, no adapter) through
        the engine's eager path — the piecewise graphs when captured, the attention between
        them — and its logits, on pages ``1..`` of the KV cache (free at start; their contents
        are never read before a request writes them); returns the seconds it took. At engine
        start on a GPU this compiles what the LoRA warm-up and graph capture do not: the prefill
        attention kernel (one binary for every batch since the page-table width is not
        specialised) and the eager logits path, so the first request does not pay ≈ 0.7 s for it
        (H200, 7B shapes, empty Triton cache). Step counters are left as they were."""
        pages = -(-num_tokens // self.page_size) + 1
        if pages > self.num_pages:
            return 0.0
        start = time.perf_counter()
        batch, _ = profiling_batch(num_tokens, 1, self.page_size, self.device)
        replays = self.piecewise.num_replays if self.piecewise is not None else 0
        hidden, _ = self._forward(batch)
        self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
        if self.piecewise is not None:  # the runner's own replay count
            self.piecewise.num_replays = replays
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    @property
    def num_piecewise_steps(self) -> int:
        """Eager steps the piecewise graphs served (0 without them)."""
        return self.piecewise.num_replays if self.piecewise is not None else 0

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    def release(self, request_id: str) -> None:
        """Forget per-request state (generator, partial head hidden states)."""
        self._generators.pop(request_id, None)
        self._head_hidden.pop(request_id, None)

    def reset_request(self, request_id: str) -> None:
        """After a preemption: partial head hidden states are recomputed, the generator is kept."""
        self._head_hidden.pop(request_id, None)

    @torch.inference_mode()
    def launch(
        self,
        scheduled: Sequence[ScheduledRequest],
        page_table_of: Callable[[str], list[int]],
        slot_of: Callable[[Request], int],
        head_tokens_of: Callable[[Request], int],
        plan_lora: Callable[[list[int]], LoRAStepPlan] | None = None,
        wait_slots: Callable[[list[int]], None] | None = None,
        mode: str = "",
        before_eager: Callable[[], None] | None = None,
        pending: LaunchedStep | None = None,
    ) -> LaunchedStep:
        """Launch the step's forward and sampling without waiting for them (``finish`` reads the
        tokens). Input tokens still pending in the requests (``PENDING_TOKEN``) are taken on the
        device from ``pending``'s sampled tokens — the step launched before this one and not yet
        finished; without it such a token is an error. ``wait_slots`` is called with the LoRA
        slots the step reads before anything is launched (the adapter manager orders the stream
        after their pending prefetches); ``before_eager`` runs first when no decode graph serves
        the step (``EngineParts.execute``); ``mode`` (the weights' mode) goes to the step trace.
        K/V of the new tokens are written in place."""
        started = time.perf_counter()
        batch, layout, image_rows, token_slots = build_forward_batch(
            scheduled, page_table_of, self.page_size, slot_of, self.device
        )
        if layout.pending:
            if pending is None or pending.sampled is None:
                raise RuntimeError("input tokens are pending but no step in flight samples them")
            fill_pending_tokens(batch.input_ids, layout.pending, pending.token_rows(),
                                pending.sampled.chosen)
        self._attach_lora(batch, token_slots, plan_lora, wait_slots)
        self._attach_images(batch, image_rows)
        hidden, graphed = self._forward(batch, before_eager)
        if graphed:
            self.num_graph_steps += 1
        else:
            self.num_eager_steps += 1
        step = LaunchedStep(started, graphed, len(scheduled), int(batch.input_ids.shape[0]),
                            lora_ops(batch), mode)
        self._collect_head_hidden(scheduled, layout.token_ranges, hidden, head_tokens_of,
                                  step.result)
        if layout.sampling_rows:
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_indices))
            step.sampling = [scheduled[i].request for i in layout.sampling_rows]
            rows = [self._sampling_row(r) for r in step.sampling]
            step.sampled = launch_sample(logits, rows)
        return step

    def finish(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens and return its result (once per step)."""
        result = step.result
        if step.sampled is not None:
            tokens, logprobs = step.sampled.read()
            for request, token, logprob in zip(step.sampling, tokens, logprobs, strict=True):
                result.sampled[request.request_id] = token
                if logprob is not None:
                    result.logprobs[request.request_id] = logprob
        # Host wall time of the step; sampling reads the tokens back, so it includes the GPU's
        # time too (a step that samples nothing is charged to the next one that does). Under
        # asynchronous scheduling a step is launched before the previous one is read: it is
        # charged from that read on (the device ran the previous step until then), so the
        # seconds of consecutive steps add up to the wall time, as in the synchronous order.
        now = time.perf_counter()
        charged_from = max(step.started, self._last_finish)
        elapsed, self._last_finish = now - charged_from, now
        result.seconds, result.graphed = elapsed, step.graphed
        if step.graphed:
            self.graph_seconds += elapsed
            self.graph_rows += step.num_rows
        else:
            self.eager_seconds += elapsed
            self.eager_tokens += step.num_tokens
        trace = self.step_trace
        if trace is not None:
            if len(trace) >= self._trace_limit:
                del trace[: len(trace) // 2]
            trace.append(StepRecord(charged_from, elapsed, step.graphed, step.num_rows,
                                    step.num_tokens, step.lora_ops, step.mode))
        return result

    def enable_step_trace(self, limit: int = 100_000) -> list[StepRecord]:
        """Record every step from now on (the oldest half dropped past ``limit``); returns the
        live list (benchmarks read the records of their run from it)."""
        self._trace_limit = max(2, limit)
        if self.step_trace is None:
            self.step_trace = []
        return self.step_trace

    def _forward(self, batch: ForwardBatch, before_eager: Callable[[], None] | None = None
                 ) -> tuple[torch.Tensor, bool]:
        """Hidden states of ``batch`` (a graph replay when one serves it, else eager) and
        whether a graph served it; ``before_eager`` runs first when no graph serves it."""
        graphs = self.graphs
        hidden = graphs.try_run(batch) if graphs is not None else None
        if hidden is not None:
            return hidden, True
        if before_eager is not None:
            before_eager()
        piecewise = self.piecewise
        hidden = piecewise.try_run(batch) if piecewise is not None else None
        if hidden is None:
            hidden = self.model.forward(batch)
        return hidden, False

    def _attach_lora(
        self,
        batch: ForwardBatch,
        token_slots: list[int],
        plan_lora: Callable[[list[int]], LoRAStepPlan] | None,
        wait_slots: Callable[[list[int]], None] | None = None,
    ) -> None:
        if self.num_lora_slots == 0:
            return
        plan = plan_lora(token_slots) if plan_lora is not None else LoRAStepPlan(token_slots)
        if wait_slots is not None:
            used = set(plan.token_slots) | set(plan.correction_slots or ())
            wait_slots(sorted(s for s in used if s >= 0))
        if self.fuse_correction and plan.correction_slots is not None:
            batch.lora = self._fused_lora_batch(plan.token_slots, plan.correction_slots)
            return
        batch.lora = self._lora_batch(plan.token_slots)
        if plan.correction_slots is not None:
            batch.lora_correction = self._lora_batch(plan.correction_slots)

    def _fused_lora_batch(self, slots: list[int], correction: list[int]) -> LoRABatch:
        """One batch for the rows' own adapters and the merged adapter's correction
        (``valora.ops.lora``, mixed mode in one op)."""
        own, corrected = upload_ints(torch.int32, [slots, correction], self.device)
        return prepare_lora_batch(
            own, self.num_lora_slots, self.lora_backend,
            active_slots={s for s in slots if s >= 0},
            correction_slots=corrected,
            correction_slot=next((c for c in correction if c >= 0), None),
            defer=True,
        )

    def _lora_batch(self, slots: list[int]) -> LoRABatch | None:
        """Metadata for one LoRA launch, ``None`` when no token uses an adapter."""
        active = {s for s in slots if s >= 0}
        if not active:
            return None
        return prepare_lora_batch(
            upload_ints(torch.int32, [slots], self.device)[0],
            self.num_lora_slots,
            self.lora_backend,
            active_slots=active,  # tiles key by their count and their largest rank
            defer=True,  # a graph replay never reads backend data; eager builds it on first use
        )

    def _attach_images(self, batch: ForwardBatch, image_rows: list[ImageRows]) -> None:
        if not image_rows:
            return
        vision = self.vision_graphs  # one vision-tower call a step (a replay when one holds it)
        encode = vision.encode if vision is not None else self.model.encode_images
        batch.image_embeds, batch.image_token_indices = step_image_embeddings(
            image_rows, self.image_cache, encode, self.device, self.dtype)

    def _collect_head_hidden(
        self,
        scheduled: Sequence[ScheduledRequest],
        ranges: list[tuple[int, int]],
        hidden: torch.Tensor,
        head_tokens_of: Callable[[Request], int],
        result: StepResult,
    ) -> None:
        for item, (flat_start, flat_end) in zip(scheduled, ranges, strict=True):
            request = item.request
            need = head_tokens_of(request)
            if need <= 0 or request.num_output_tokens > 0:
                continue
            first_needed = request.num_prompt_tokens - need
            start = request.num_computed_tokens
            lo = max(start, first_needed)
            end = start + (flat_end - flat_start)
            if lo < end:
                self._head_hidden.setdefault(request.request_id, []).append(
                    hidden[flat_start + lo - start : flat_end].clone()
                )
            if end >= request.num_prompt_tokens:
                parts = self._head_hidden.pop(request.request_id, [])
                result.head_hidden[request.request_id] = torch.cat(parts)

    def _sampling_row(self, request: Request) -> SamplingRow:
        if request.request_id not in self._generators:
            self._num_generated_seeds += 1
            fallback = (self.seed * 1_000_003 + self._num_generated_seeds) & 0x7FFFFFFF
            self._generators[request.request_id] = make_generator(
                request.sampling_params, self.device, fallback
            )
        params = request.sampling_params
        banned: tuple[int, ...] = ()
        if request.num_output_tokens < params.min_tokens:
            banned = tuple(request.eos_token_ids) + params.stop_token_ids
        return SamplingRow(
            params=params, generator=self._generators[request.request_id], banned_token_ids=banned
        )
