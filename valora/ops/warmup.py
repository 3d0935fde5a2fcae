"""Compile every Triton LoRA kernel variant the engine can select, before serving.

Each distinct tile configuration and argument specialisation is a separate Triton binary,
compiled on its first launch — in the middle of serving, a 0.5–1 s stall. ``valora.ops.
lora_variants`` enumerates the (shrink, expand) binary pairs calls on a layer shape can select
and ``plan_launches`` keeps a subset covering every binary; ``warm_up_lora_kernels`` runs one
real ``lora_apply`` per kept pair on zero scratch activations, with the layer's own slot tensors
(read, never written; no copy) under a host rank mirror that makes the launcher key the call by
the wanted rank (the device ranks stay as they are — 0 at engine start — so the kernels'
programs return at once: compiling is all they do).

Compiling dominates (on an H200 host with a cold Triton cache: 140 variants in 142 s, 70 in
35–81 s), and Triton's compiler runs in parallel from Python threads (8 LoRA binaries for
sm_90 with Triton 3.9 on a 2-core machine: 3.75–4.41 s in one thread, 1.58–1.90 s in two,
``bench/ops/compile_threads.py``, ``bench/results/ops/compile_threads_cpu.txt``; not yet
measured with the GPU machine's Triton 3.6), so on CUDA the launches run from ``threads``
worker threads (default: one per CPU core,
at most 16); each variant's launch is independent (its own batch and ``h`` buffer; the kernels
write nothing, every program returns at once). Should anything fail there, the warm-up logs it
and runs every launch again in order on the calling thread (what a cache already holds costs
nothing). Under Triton's CPU interpreter (tests) the launches always run in order — the
interpreter patches ``triton.language`` process-wide while a kernel runs.

Assumptions: activations are contiguous along features with a row stride of the layer width and
16-byte-aligned base pointers (what ``FusedLinear`` passes); a call on an unaligned view would
still compile on first use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from valora.logger import get_logger
from valora.ops.lora import (
    LoRABatch,
    LoRASlotWeights,
    available_lora_backends,
    lora_apply,
    prepare_lora_batch,
    resolve_lora_backend,
)
from valora.ops.lora_segments import unhinted_lora_batch
from valora.ops.lora_variants import LoRALayerShape, LoRAVariant, plan_warm_up

logger = get_logger(__name__)
MAX_THREADS = 16


@dataclass(frozen=True)
class WarmUpReport:
    """What a warm-up did: ``variants`` distinct (shrink, expand) pairs, covered by ``launches``
    ``lora_apply`` calls compiling ``shrink_kernels + expand_kernels`` binaries (fewer when
    Triton's in-process cache already held some) in ``seconds`` (wall clock, GPU drained)."""

    layer_shapes: int = 0
    variants: int = 0
    launches: int = 0
    shrink_kernels: int = 0
    expand_kernels: int = 0
    seconds: float = 0.0
    threads: int = 1
    """Worker threads the launches ran on (1: in order on the calling thread)."""

    @property
    def kernels(self) -> int:
        return self.shrink_kernels + self.expand_kernels


def warm_up_enabled(device: torch.device, backend: str = "triton") -> bool:
    """Whether ``warm_up_lora_kernels`` would launch anything: the ``backend`` resolves to
    ``"triton"``, Triton is installed, and ``device`` is CUDA or the kernels run in Triton's CPU
    interpreter (``TRITON_INTERPRET=1``, tests)."""
    if resolve_lora_backend(backend, device) != "triton" or "triton" not in \
            available_lora_backends():  # registered only when Triton is installed
        return False
    if device.type == "cuda":
        return True
    from valora.ops.triton_lora import kernels_interpreted

    return device.type == "cpu" and kernels_interpreted()


def _shapes(layers: Iterable[LoRASlotWeights]) -> dict[LoRALayerShape, LoRASlotWeights]:
    """The first layer of each distinct shape (a fused layer, listed once per slice by a slot
    map, counts once)."""
    shapes: dict[LoRALayerShape, LoRASlotWeights] = {}
    for weights in layers:
        shapes.setdefault(LoRALayerShape.of(weights), weights)
    return shapes


def _keyed_by(weights: LoRASlotWeights, rank: int) -> LoRASlotWeights:
    """``weights``' own tensors (shared, not copied) under a host rank mirror of ``rank`` for
    every slot and slice, so that a batch with known slots keys its lookup by ``tile_rank(rank,
    R)`` = ``rank`` (a key rank). The mirror only steers host choices — the lookup and how many
    rank blocks the shrink grid spans — never what the kernels read, so ``weights`` and its
    mirror are left as they are."""
    mirror = [[rank] * len(weights.slice_widths) for _ in range(weights.num_slots)]
    return LoRASlotWeights(weights.lora_a, weights.lora_b, weights.ranks, weights.scales,
                           weights.slice_widths, mirror)


def _batch(variant: LoRAVariant, num_slots: int, device: torch.device) -> LoRABatch:
    """A batch whose call selects ``variant``: its token count, adapter count (the tiling
    hint) and, for a correction variant, a merged slot outside the tokens' own slots (every
    token corrected; which slots does not matter to the binaries). A mix variant's batch keeps
    its slots from the host (segments updated on the device, as in a CUDA graph)."""
    tokens, active = variant.num_tokens, variant.num_adapters
    if variant.mix:  # slots unknown to the host, as a captured graph's segments
        corrected = None
        slots = torch.arange(tokens, dtype=torch.int32, device=device) % num_slots
        if variant.correction:  # merged slot 0, own slots beside it (as below)
            corrected = torch.zeros(tokens, dtype=torch.int32, device=device)
            slots = (1 + slots % (num_slots - 1)) if num_slots > 1 else torch.full_like(slots, -1)
        return unhinted_lora_batch(slots, num_slots, corrected)
    if not variant.correction:
        slots = torch.arange(tokens, dtype=torch.int32, device=device) % active
        return prepare_lora_batch(slots, num_slots, "triton", num_active_slots=active,
                                  active_slots=range(active))
    merged = 0
    own = [1 + t % min(active, num_slots - 1) if num_slots > 1 else -1 for t in range(tokens)]
    return prepare_lora_batch(
        torch.tensor(own, dtype=torch.int32, device=device), num_slots, "triton",
        num_active_slots=active, active_slots={s for s in own if s >= 0},
        correction_slots=torch.full((tokens,), merged, dtype=torch.int32, device=device),
        correction_slot=merged)


def warm_up_threads(device: torch.device, requested: int = 0) -> int:
    """Worker threads for the warm-up's launches: ``requested`` when positive, else one per CPU
    core (at most ``MAX_THREADS``); 1 off CUDA (Triton's interpreter is not thread-safe)."""
    if device.type != "cuda":
        return 1
    if requested > 0:
        return requested
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def run_launches(launches: list[Callable[[], None]], device: torch.device, threads: int) -> int:
    """Run ``launches`` on ``threads`` workers (each under inference mode on ``device``), or in
    order here; returns the threads used (1 after a failure in the workers, which reruns all
    of them in order: compiled binaries are cached, so that costs only what failed)."""
    if threads > 1 and len(launches) > 1:
        def work(launch: Callable[[], None]) -> None:
            with torch.inference_mode():  # thread-local, as the current CUDA device is
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        launch()
                else:
                    launch()

        try:
            with ThreadPoolExecutor(min(threads, len(launches)),
                                    thread_name_prefix="valora-warmup") as pool:
                list(pool.map(work, launches))
            return min(threads, len(launches))
        except Exception as exc:  # whatever failed, the plain loop below redoes it all
            logger.warning("LoRA warm-up on %d threads failed (%s: %s); compiling in order",
                           threads, type(exc).__name__, exc)
    for launch in launches:
        launch()
    return 1


@torch.inference_mode()
def warm_up_lora_kernels(layers: Iterable[LoRASlotWeights], max_tokens: int, max_adapters: int,
                         device: torch.device | str, backend: str = "triton",
                         fused_correction: bool = False, threads: int = 0) -> WarmUpReport:
    """Compile every LoRA kernel binary that calls on ``layers`` with ``1..max_tokens`` tokens,
    ``1..min(T, max_adapters)`` active adapters and any key rank can select
    (``enumerate_lora_variants`` per layer shape; pairs shared by several shapes count once),
    by one ``lora_apply`` per pair ``plan_launches`` keeps, on zero scratch activations
    ``[T, in_features]`` / ``[T, out_features]`` (one buffer per layer shape, sized for its
    largest launch) and the slot tensors of the first layer of each shape, which are only read
    (``_keyed_by``). ``max_adapters`` is capped at each layer's slot count.

    ``fused_correction`` (``LoRAConfig.fuse_correction``): also every binary of batches that
    carry the mixed-mode correction (``valora.ops.lora``). ``threads``: worker threads for the
    launches (``warm_up_threads``; 0 = one per core on CUDA; module docstring).

    A no-op (an empty report) unless ``warm_up_enabled(device, backend)``. Adds no host-device
    synchronisation but one ``torch.cuda.synchronize`` at the end (for the timing)."""
    device = torch.device(device)
    if not warm_up_enabled(device, backend):
        return WarmUpReport()
    start = time.perf_counter()
    shapes = _shapes(layers)
    found, plan = plan_warm_up({shape: min(max_adapters, weights.num_slots)
                                for shape, weights in shapes.items()}, max_tokens, device,
                               (False, True) if fused_correction else (False,))
    launches: list[Callable[[], None]] = []
    for shape, weights in shapes.items():
        mine = [v for v in plan if v.shape == shape]
        if not mine:
            continue
        rows = max(v.num_tokens for v in mine)
        x = torch.zeros(rows, shape.in_features, dtype=shape.dtype, device=device)
        y = torch.zeros(rows, sum(shape.slice_widths), dtype=shape.dtype, device=device)
        for variant in mine:
            launches.append(_launch(x[:variant.num_tokens], y[:variant.num_tokens],
                                    _keyed_by(weights, variant.key_rank),
                                    _batch(variant, weights.num_slots, device)))
    used = run_launches(launches, device, warm_up_threads(device, threads))
    launches.clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return WarmUpReport(len(shapes), len(found), len(plan), len({v.shrink for v in plan}),
                        len({v.expand for v in plan}), time.perf_counter() - start, used)


def _launch(x: torch.Tensor, y: torch.Tensor, weights: LoRASlotWeights,
            batch: LoRABatch) -> Callable[[], None]:
    """One warm-up call, bound to its own batch (threads never share a batch's plan cache)."""
    return lambda: lora_apply(y, x, weights, batch)
