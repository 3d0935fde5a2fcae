"""GPU memory planning: how many KV pages fit, and where the memory went.

``plan_gpu_memory`` runs after the weights and adapter slots are allocated and before the KV
cache exists. It measures the activation peak of one profiling forward at the step's largest
shape (``max_num_tokens`` tokens over ``max_num_seqs`` prefill sequences, their logits, LoRA on
every token when slots exist) over a small temporary KV cache, and the peak of one decode step
at the largest CUDA-graph bucket (graph pools are sized from it), plus the vision tower's at its
largest graph bucket and, with piecewise graphs, their static buffers and one more activation
peak. Then::

    budget    = memory_fraction · total
    in_use    = total - free                 (context, weights, adapter slots, the pristine copy
                                              of a merging mode policy, other tensors)
    kv_bytes  = budget - in_use - activation_peak - graph_reserve
    num_pages = kv_bytes // bytes_per_page,  bytes_per_page = 2 · layers · page_size · KV · D · e

``MemoryPlan.table()`` is the log line saying where the memory went. ``SlotPrefetcher`` copies
adapter weights from pinned host memory into slots on a side stream (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from valora.engine.piecewise_graphs import piecewise_static_bytes
from valora.engine.vision_graphs import image_input_shape
from valora.errors import OutOfResourcesError, ValoraError
from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.logger import get_logger
from valora.models.base import CausalLMBase
from valora.ops.lora import prepare_lora_batch

logger = get_logger(__name__)
MIB = 2**20
GRAPH_MARGIN_BYTES = 64 * MIB


@dataclass(frozen=True)
class MemoryPlan:
    """Byte counts of one device and the KV page count that follows (module docstring)."""

    total_bytes: int
    memory_fraction: float
    in_use_bytes: int
    weight_bytes: int
    adapter_slot_bytes: int
    activation_peak_bytes: int
    graph_reserve_bytes: int
    bytes_per_page: int
    pristine_bytes: int = 0
    """Device bytes of the mode switcher's pristine copy (inside ``in_use_bytes``; 0 when the
    policy never merges or the copy lives in host memory)."""

    @property
    def budget_bytes(self) -> int:
        return int(self.total_bytes * self.memory_fraction)

    @property
    def other_bytes(self) -> int:
        """In use before the plan but neither weights, adapter slots nor the pristine copy."""
        return (self.in_use_bytes - self.weight_bytes - self.adapter_slot_bytes
                - self.pristine_bytes)

    @property
    def kv_budget_bytes(self) -> int:
        return (
            self.budget_bytes
            - self.in_use_bytes
            - self.activation_peak_bytes
            - self.graph_reserve_bytes
        )

    @property
    def num_pages(self) -> int:
        return max(0, self.kv_budget_bytes // self.bytes_per_page)

    def check(self) -> None:
        """``OutOfResourcesError`` when fewer than two pages (null page + one) fit."""
        if self.num_pages < 2:
            raise OutOfResourcesError(
                f"no room for the KV cache: {self.budget_bytes / MIB:.0f} MiB budget "
                f"(memory_fraction {self.memory_fraction}) minus {self.in_use_bytes / MIB:.0f} "
                f"MiB in use, {self.activation_peak_bytes / MIB:.0f} MiB activations and "
                f"{self.graph_reserve_bytes / MIB:.0f} MiB graphs leaves "
                f"{self.kv_budget_bytes / MIB:.0f} MiB; raise memory_fraction or lower "
                "max_num_batched_tokens / max_loras"
            )

    def table(self) -> str:
        """A small fixed-width table: one row per use, in MiB and as a share of the device."""
        rows = [
            ("weights", self.weight_bytes),
            ("adapter slots", self.adapter_slot_bytes),
            ("pristine copy (switching)", self.pristine_bytes),
            ("context + other", self.other_bytes),
            ("activation peak", self.activation_peak_bytes),
            ("cuda graphs (reserve)", self.graph_reserve_bytes),
            (f"kv cache ({self.num_pages} pages)", self.num_pages * self.bytes_per_page),
        ]
        rows.append(
            ("unused (outside the budget)", self.total_bytes - sum(size for _, size in rows))
        )
        lines = [f"{'memory':<28}{'MiB':>12}{'share':>8}"]
        for name, size in rows:
            lines.append(f"{name:<28}{size / MIB:>12.1f}{size / self.total_bytes:>8.1%}")
        lines.append(f"{'device total':<28}{self.total_bytes / MIB:>12.1f}{1:>8.0%}")
        return "\n".join(lines)


def kv_bytes_per_page(model: CausalLMBase, page_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    spec = model.spec
    return 2 * spec.num_layers * page_size * spec.num_kv_heads * spec.head_dim * element


def _unique_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def weight_and_slot_bytes(model: CausalLMBase) -> tuple[int, int]:
    """``(parameter bytes, adapter slot bytes)`` of ``model`` (shared storage counted once)."""
    weights = _unique_bytes(list(model.parameters()))
    slots: list[torch.Tensor] = []
    for linear, _ in model.decoder.lora_targets().values():
        lw = linear.lora_weights
        if lw is not None:
            slots += [lw.lora_a, lw.lora_b, lw.ranks, lw.scales]
    return weights, _unique_bytes(slots)


def profiling_batch(
    num_tokens: int,
    num_seqs: int,
    page_size: int,
    device: torch.device,
    lora_slots: int = 0,
    lora_backend: str = "auto",
) -> tuple[ForwardBatch, int]:
    """A prefill batch of ``num_tokens`` over ``num_seqs`` fresh sequences laid out on pages
    ``1..``; returns it and the number of pages it needs (page 0 stays the null page)."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    starts, tables, slots, next_page = [0], [], [], 1
    for length in lengths:
        pages = list(range(next_page, next_page + -(-length // page_size)))
        next_page += len(pages)
        tables.append(pages)
        slots += [pages[j // page_size] * page_size + j % page_size for j in range(length)]
        starts.append(starts[-1] + length)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    attn = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        page_table=table.to(device),
        slot_mapping=torch.tensor(slots, device=device),
        page_size=page_size,
        query_lens_cpu=lengths,
        seq_lens_cpu=list(lengths),
    )
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=positions,
        attn=attn,
        logits_indices=torch.tensor(starts[1:], device=device) - 1,
    )
    if lora_slots:
        batch.lora = prepare_lora_batch(
            torch.arange(num_tokens, device=device, dtype=torch.int32) % lora_slots,
            lora_slots,
            lora_backend,
        )
    return batch, next_page


@torch.inference_mode()
def measure_step_peak(
    model: CausalLMBase, batch: ForwardBatch, num_pages: int, page_size: int
) -> int:
    """Peak bytes allocated above the starting point by ``forward`` + ``compute_logits`` of
    ``batch`` over a temporary KV cache of ``num_pages`` pages (the model's caches restored)."""
    device, dtype = model.device, model.dtype
    previous = list(model.kv_caches)
    shape = model.kv_cache_shape(num_pages, page_size)
    caches = [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(model.spec.num_layers)
    ]
    model.bind_kv_caches(caches)
    try:
        return peak_bytes(
            lambda: model.compute_logits(model.forward(batch).index_select(0, batch.logits_indices)),
            device)
    finally:
        model.kv_caches = previous
        del caches
        torch.cuda.empty_cache()


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` above the starting point while ``run()`` executes."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - start)


def vision_peak_bytes(model: Any, num_images: int) -> int:
    """Peak bytes of one eager ``encode_images`` of ``num_images`` images (what a vision-tower
    graph bucket of that size keeps in its pool, ``valora.engine.vision_graphs``)."""
    device = torch.device(model.device)
    shape = (num_images, *image_input_shape(model))

    @torch.inference_mode()
    def encode() -> None:  # the input counts too: a graph's static input lives as long
        model.encode_images(torch.zeros(shape, dtype=model.dtype, device=device))

    peak = peak_bytes(encode, device)
    torch.cuda.empty_cache()
    return peak


def plan_gpu_memory(
    model: CausalLMBase,
    *,
    page_size: int,
    memory_fraction: float,
    max_num_tokens: int,
    max_num_seqs: int,
    graph_batch: int = 0,
    lora_backend: str = "auto",
    pristine_bytes: int = 0,
    vision_images: int = 0,
    piecewise_tokens: int = 0,
) -> MemoryPlan:
    """Profile ``model`` on its CUDA device and size the KV cache (module docstring).
    ``pristine_bytes``: device bytes of an already allocated pristine copy (a row of the table;
    the bytes are in use either way). ``vision_images`` (with ``graph_batch``): the largest
    vision-tower graph bucket; the graph reserve also holds its pool (``vision_graphs``).
    ``piecewise_tokens``: the largest piecewise-graph bucket (``piecewise_graphs``); the reserve
    holds its static buffers and a pool of one eager step's activation peak (a piece runs a part
    of a forward's ops over as many rows, and its pool lives beside the eager allocations)."""
    device = model.device
    if device.type != "cuda":
        raise ValoraError("plan_gpu_memory needs a CUDA model; size CPU caches in bytes instead")
    lora_slots = 0
    for linear, _ in model.decoder.lora_targets().values():
        if linear.lora_weights is not None:
            lora_slots = linear.lora_weights.num_slots
            break
    batch, pages = profiling_batch(
        max_num_tokens, max_num_seqs, page_size, device, lora_slots, lora_backend
    )
    activation = measure_step_peak(model, batch, pages, page_size)
    graph_reserve = 0
    if graph_batch:
        decode, pages = profiling_batch(
            graph_batch, graph_batch, page_size, device, lora_slots, lora_backend
        )
        graph_reserve = measure_step_peak(model, decode, pages, page_size) + GRAPH_MARGIN_BYTES
        if vision_images and getattr(model, "vision_tower", None) is not None:
            graph_reserve += vision_peak_bytes(model, vision_images)
    if piecewise_tokens:
        graph_reserve += activation + piecewise_static_bytes(model, piecewise_tokens)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    weights, slots = weight_and_slot_bytes(model)
    plan = MemoryPlan(
        total_bytes=int(total),
        memory_fraction=memory_fraction,
        in_use_bytes=int(total - free),
        weight_bytes=weights,
        adapter_slot_bytes=slots,
        activation_peak_bytes=activation,
        graph_reserve_bytes=graph_reserve,
        bytes_per_page=kv_bytes_per_page(model, page_size, model.dtype),
        pristine_bytes=pristine_bytes,
    )
    plan.check()
    logger.info("memory plan on %s:\n%s", torch.cuda.get_device_name(device), plan.table())
    return plan


@dataclass
class PrefetchTicket:
    """One submitted slot fill: ``ready()`` polls, ``wait()`` orders the current stream after
    it (no host synchronisation). ``sources`` keeps the pinned host tensors alive meanwhile."""

    event: torch.cuda.Event | None
    device: torch.device
    sources: list[torch.Tensor] = field(default_factory=list)

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.wait(torch.cuda.current_stream(self.device))


class SlotPrefetcher:
    """Asynchronous host → slot copies on a side CUDA stream (synchronous on the CPU).

    ``submit(copies, zeros)`` first orders the side stream after the work already queued on the
    current stream (a slot being refilled may still be read by the step in flight), zeroes each
    tensor of ``zeros``, then copies each ``(device destination, host source)`` pair; host
    sources should be pinned (``pin``) so the copies overlap compute. A step that reads the slot
    calls ``ticket.wait()`` before launching. Failures raise ``ValoraError`` naming the copy.
    """

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of a host tensor (itself on a CPU-only machine, or when it is
        page-locked already). PyTorch's pinned memory, not ``valora.engine.host_memory``'s
        registered memory: registering cost ≈ 30–40 ms more per 7B-shaped adapter load on an
        H200 (``bench/results/model/host-staging-ab-h200-fab2eac/``). After a device fault the
        dead engine is retained (``valora.engine.faults``), so these are never freed against
        the dead context."""
        if self.stream is None or tensor.is_pinned():
            return tensor
        return tensor.pin_memory()

    def submit(
        self,
        copies: Sequence[tuple[torch.Tensor, torch.Tensor]],
        zeros: Sequence[torch.Tensor] = (),
    ) -> PrefetchTicket:
        for index, (dst, src) in enumerate(copies):
            if dst.shape != src.shape or dst.device != self.device:
                raise ValoraError(
                    f"slot prefetch copy {index}: destination {tuple(dst.shape)} on "
                    f"{dst.device}, source {tuple(src.shape)}"
                )
        if self.stream is None:
            for tensor in zeros:
                tensor.zero_()
            for dst, src in copies:
                dst.copy_(src)
            return PrefetchTicket(None, self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(self.stream):
                for tensor in zeros:
                    tensor.zero_()
                for dst, src in copies:
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        except RuntimeError as exc:
            raise ValoraError(f"adapter slot prefetch failed: {exc}") from exc
        return PrefetchTicket(event, self.device, [src for _, src in copies])
