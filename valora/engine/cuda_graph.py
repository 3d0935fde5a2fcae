"""CUDA graphs for decode steps: one graph per batch-size bucket and LoRA variant.

A decode step (every sequence one new token, no image rows) of ``B`` sequences runs the graph of
the smallest bucket ``≥ B``. Everything the graph reads lives in static buffers sized for the
largest bucket: input ids, positions, ``query_start_loc`` (the constant ``0..bucket``), seq lens,
page tables, slot mapping, logits rows and per-token LoRA slots. ``run`` copies the step's
metadata into them and replays; rows ``B..bucket`` are padding: id 0, position 0, sequence
length 0 (attention returns zeros), K/V written to slot 0 of the null page, LoRA slot -1.

LoRA: the graph reads adapter weights from the model's slot storage (rewritten in place when
adapters change) and the token grouping from ``LoRASegments`` buffers owned here, rebuilt on the
device from the static token slots inside the graph (or, if capturing that fails, just before
the replay). So graphs depend on the bucket and the *variant* only — ``"base"`` (no LoRA),
``"lora"`` and ``"mixed"`` (LoRA + merged-adapter correction; also a correction alone, with every
token slot -1; ``valora.engine.graph_lora``) — never on which adapters run. With
``fuse_correction`` the ``mixed`` graph runs one LoRA op per layer with the correction inside
(``valora.ops.lora``; its segments read both static slot buffers), else two; either replays
batches of either form.

Few adapters: at the buckets of ``few_adapter_buckets`` the ``"lora"`` graph is captured twice,
the second time with the base projections on cuBLAS instead of the skinny GEMM
(``valora.ops.skinny_gemm``); a step whose batch has at most ``few_adapter_max`` distinct adapters
(host-known: ``LoRABatch.num_active_slots``) replays that one. Beside a LoRA op on the side stream
(``valora.layers.lora_overlap``) cuBLAS leaves SMs free where the skinny GEMM does not, which
pays with few adapters and costs with many (``LoRAConfig.few_adapter_max``). Both captures compute
the same sums up to the GEMMs' rounding.

Invariants: the model's KV caches, LoRA slot tensors and weights keep their storage after
``capture`` (rebinding caches or calling ``init_lora`` again needs a new runner); the hidden
states ``run`` returns are a view of the graph's output, valid until the next ``run``.
With ``use_graphs=False`` (the CPU, tests) the same buffers are run eagerly.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from valora.config import LoRAConfig
from valora.engine.graph_lora import (
    StaticSegments,
    attach_static_lora,
    check_variants,
    fill_lora_slots,
    lora_variant_served,
    variant_of,
)
from valora.errors import ValoraError
from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.logger import get_logger
from valora.models.base import CausalLMBase
from valora.ops.skinny_gemm import skinny_gemm_enabled, skinny_gemm_forced

logger = get_logger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
FEW_ADAPTERS = "lora_few"
"""The entry key of a bucket's second ``"lora"`` capture (module docstring: few adapters)."""


def smallest_bucket(buckets: Sequence[int], size: int) -> int | None:
    """The smallest of ``buckets`` (ascending) that holds ``size``, or None: the bucket a step
    pads to in every graph runner (decode, piecewise, vision tower)."""
    index = bisect.bisect_left(buckets, size)
    return buckets[index] if index < len(buckets) else None


def capped_buckets(limit: int, buckets: Iterable[int], name: str) -> tuple[int, ...]:
    """The ``buckets`` below ``limit``, plus ``limit`` itself, ascending (every graph runner's
    bucket list; ``name`` names ``limit`` in the error)."""
    if limit < 1:
        raise ValoraError(f"{name} must be >= 1, got {limit}")
    return tuple(sorted({b for b in buckets if 0 < b < limit} | {limit}))


def batch_buckets(max_batch: int, buckets: Iterable[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets below ``max_batch``, plus ``max_batch`` itself (sorted)."""
    return capped_buckets(max_batch, buckets, "max_batch")


def capture_largest_first(device: torch.device, buckets: Sequence[int], variants: Sequence[str],
                          capture: Callable[[tuple[int, str]], None]) -> float:
    """``capture((bucket, variant))`` for every pair, largest bucket first (smaller ones then
    fit into the pool's blocks); returns the MiB the device reserved meanwhile."""
    before = torch.cuda.memory_reserved(device)
    for size in reversed(buckets):
        for variant in variants:
            capture((size, variant))
    torch.cuda.synchronize(device)
    return (torch.cuda.memory_reserved(device) - before) / 2**20


@dataclass
class _Entry:
    """One bucket × variant: its static batch, segments and (once captured) graph + output."""

    batch: ForwardBatch
    segments: list[StaticSegments]
    """``(segments, token slots, correction slots or None)`` rebuilt before each replay."""
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None
    update_in_graph: bool = True


class CudaGraphRunner:
    """Captures and replays decode steps of ``model`` (see the module docstring)."""

    def __init__(
        self,
        model: CausalLMBase,
        max_batch: int,
        *,
        max_context: int,
        page_size: int,
        num_lora_slots: int = 0,
        variants: Iterable[str] = ("base", "lora"),
        buckets: Iterable[int] = DEFAULT_BUCKETS,
        use_graphs: bool | None = None,
        fuse_correction: bool = False,
        few_adapter_buckets: Iterable[int] = (),
        few_adapter_max: int = 0,
    ) -> None:
        backend = model.decoder.backend
        if not getattr(backend, "graph_capturable", False):
            raise ValoraError(
                f"attention backend {backend.name!r} cannot be captured in a CUDA "
                "graph (use the 'triton' backend)"
            )
        rope = model.decoder.rotary.config
        if rope.length_threshold is not None:
            raise ValoraError(
                f"RoPE {rope.rope_type!r} changes with context length; decode "
                "steps cannot be replayed from a graph"
            )
        self.variants = check_variants(variants, num_lora_slots)
        self.model = model
        self.device = model.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.page_size = page_size
        self.max_pages = -(-max_context // page_size)
        self.max_context = self.max_pages * page_size
        self.num_lora_slots = num_lora_slots
        self.fuse_correction = fuse_correction
        self.buckets = batch_buckets(max_batch, buckets)
        self._allocate_static(self.buckets[-1])
        self._entries = {
            (b, v): self._make_entry(b, v) for b in self.buckets for v in self.variants
        }
        wanted = set(few_adapter_buckets) if few_adapter_max > 0 and "lora" in self.variants else ()
        self.few_adapter_buckets = tuple(b for b in self.buckets if b in wanted)
        self.few_adapter_max = few_adapter_max
        for b in self.few_adapter_buckets:
            self._entries[(b, FEW_ADAPTERS)] = self._make_entry(b, "lora")
        self._pool: object | None = None
        self.captured = False

    # ----- static state ---------------------------------------------------------------------
    def _allocate_static(self, size: int) -> None:
        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        self.input_ids = zeros(size, dtype=torch.int64)
        self.positions = zeros(size, dtype=torch.int64)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=self.device)
        self.seq_lens = zeros(size, dtype=torch.int32)
        self.page_table = zeros(size, self.max_pages, dtype=torch.int32)
        self.slot_mapping = zeros(size, dtype=torch.int64)
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=self.device)
        self.token_slots = torch.full((size,), -1, dtype=torch.int32, device=self.device)
        self.correction_slots = torch.full((size,), -1, dtype=torch.int32, device=self.device)

    def _make_entry(self, size: int, variant: str) -> _Entry:
        attn = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            page_table=self.page_table[:size],
            slot_mapping=self.slot_mapping[:size],
            page_size=self.page_size,
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_context] * size,
        )  # worst case: sizes the split-K plan
        batch = ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            attn=attn,
            logits_indices=self.logits_indices[:size],
        )
        segments = attach_static_lora(batch, variant, self.token_slots[:size],
                                      self.correction_slots[:size], self.num_lora_slots,
                                      self.fuse_correction)
        return _Entry(batch, segments)

    # ----- capture --------------------------------------------------------------------------
    def _body(self, entry: _Entry, in_graph: bool) -> torch.Tensor:
        if in_graph:
            for segments, slots, correction in entry.segments:
                segments.update(slots, correction_slots=correction)
        hidden: torch.Tensor = self.model(entry.batch)
        return hidden

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles every kernel configuration) and capture all graphs, largest first."""
        if self.captured:
            return
        if not self.use_graphs:
            self.captured = True
            return
        self._pool = torch.cuda.graph_pool_handle()
        variants = (*self.variants, FEW_ADAPTERS) if self.few_adapter_buckets else self.variants
        mib = capture_largest_first(self.device, self.buckets, variants, self._capture_key)
        self.captured = True
        few = (f"; buckets {list(self.few_adapter_buckets)} again with the base GEMM on cuBLAS "
               f"for <= {self.few_adapter_max} adapters") if self.few_adapter_buckets else ""
        logger.info("captured %d decode graphs (buckets %s, variants %s%s): %.1f MiB",
                    len(self._entries), list(self.buckets), list(self.variants), few, mib)

    def _capture_key(self, key: tuple[int, str]) -> None:
        entry = self._entries.get(key)
        if entry is None:  # a bucket without a few-adapter capture
            return
        if key[1] != FEW_ADAPTERS:
            self._capture_entry(entry)
            return
        with skinny_gemm_forced(False):
            self._capture_entry(entry)

    def _capture_entry(self, entry: _Entry) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._body(entry, in_graph=True)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for in_graph in (True, False) if entry.segments else (True,):
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):  # type: ignore[arg-type]
                    entry.output = self._body(entry, in_graph)
            except RuntimeError as exc:
                if not in_graph or not entry.segments:
                    raise
                logger.warning(
                    "LoRA segment update not capturable (%s); it runs before each replay instead",
                    exc,
                )
                torch.cuda.synchronize(self.device)
                continue
            entry.graph, entry.update_in_graph = graph, in_graph
            return

    # ----- replay ---------------------------------------------------------------------------
    def bucket_for(self, num_seqs: int) -> int | None:
        return smallest_bucket(self.buckets, num_seqs)

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether ``batch`` is a decode step a captured graph can serve."""
        attn = batch.attn
        num_seqs = attn.num_seqs
        if not self.captured or num_seqs == 0 or batch.image_embeds is not None:
            return False
        if batch.num_tokens != num_seqs or any(n != 1 for n in attn.query_lens_cpu):
            return False
        if self.bucket_for(num_seqs) is None or attn.page_size != self.page_size:
            return False
        if attn.page_table.shape[1] > self.max_pages or max(attn.seq_lens_cpu) > self.max_context:
            return False
        return lora_variant_served(batch, self.num_lora_slots, self.fuse_correction,
                                   self.variants)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states ``[num_seqs, hidden]`` of a decode step (``can_run`` must hold)."""
        hidden = self.try_run(batch)
        if hidden is None:
            raise ValoraError("CudaGraphRunner.run: batch is not a decode step this runner serves")
        return hidden

    def try_run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """``run(batch)`` when ``can_run(batch)``, else None (the step checked once)."""
        return self._replay(batch) if self.can_run(batch) else None

    def entry_key(self, batch: ForwardBatch, size: int) -> tuple[int, str]:
        """The capture replaying ``batch`` at bucket ``size``: its variant's, or the few-adapter
        one (module docstring) when the host knows the batch has few enough adapters."""
        variant = variant_of(batch)
        lora = batch.lora
        if (variant == "lora" and size in self.few_adapter_buckets and lora is not None
                and 0 <= lora.num_active_slots <= self.few_adapter_max):
            return size, FEW_ADAPTERS
        return size, variant

    @torch.inference_mode()
    def _replay(self, batch: ForwardBatch) -> torch.Tensor:
        num_seqs = batch.attn.num_seqs
        size = self.bucket_for(num_seqs)
        assert size is not None
        entry = self._entries[self.entry_key(batch, size)]
        self._fill(batch, num_seqs, size)
        if entry.graph is None:
            return self._body(entry, in_graph=True)[:num_seqs]
        if not entry.update_in_graph:
            for segments, slots, correction in entry.segments:
                segments.update(slots, correction_slots=correction)
        entry.graph.replay()
        assert entry.output is not None
        return entry.output[:num_seqs]

    def _fill(self, batch: ForwardBatch, num_seqs: int, size: int) -> None:
        attn = batch.attn
        self.input_ids[:num_seqs].copy_(batch.input_ids)
        self.positions[:num_seqs].copy_(batch.positions)
        self.seq_lens[:num_seqs].copy_(attn.seq_lens)
        self.slot_mapping[:num_seqs].copy_(attn.slot_mapping)
        self.page_table[:num_seqs, : attn.page_table.shape[1]].copy_(attn.page_table)
        if size > num_seqs:
            for buffer in (self.input_ids, self.positions, self.seq_lens, self.slot_mapping):
                buffer[num_seqs:size].zero_()
        fill_lora_slots(batch, self.token_slots, self.correction_slots, num_seqs, size)


def few_adapter_captures(lora: LoRAConfig, device: torch.device) -> tuple[tuple[int, ...], int]:
    """``(few_adapter_buckets, few_adapter_max)`` for a runner on ``device`` under ``lora``
    (module docstring): none where the skinny GEMM does not serve the base projections — both
    captures would be the same — or where ``few_adapter_max`` is 0."""
    if lora.few_adapter_max == 0 or not skinny_gemm_enabled(device):
        return (), 0
    return lora.few_adapter_bucket_sizes(), lora.few_adapter_max


def capture_decode_graphs(
    model: CausalLMBase,
    max_batch: int,
    *,
    max_context: int,
    page_size: int,
    num_lora_slots: int,
    variants: Iterable[str],
    purpose: str = "decode steps run eagerly",
    fuse_correction: bool = False,
    few_adapter_buckets: Iterable[int] = (),
    few_adapter_max: int = 0,
) -> CudaGraphRunner | None:
    """A captured ``CudaGraphRunner``, or None (with a warning naming ``purpose``) where the
    runner cannot serve the model: an attention backend that is not capturable, length-dependent
    RoPE. Without LoRA slots only the ``"base"`` variant is captured; ``few_adapter_*`` as the
    runner's (module docstring)."""
    wanted = list(variants)
    if num_lora_slots == 0:
        wanted = [v for v in wanted if v == "base"] or ["base"]
    try:
        runner = CudaGraphRunner(model, max_batch, max_context=max_context, page_size=page_size,
                                 num_lora_slots=num_lora_slots, variants=wanted,
                                 fuse_correction=fuse_correction,
                                 few_adapter_buckets=few_adapter_buckets,
                                 few_adapter_max=few_adapter_max)
        runner.capture()
    except ValoraError as exc:
        logger.warning("CUDA graphs disabled, %s: %s", purpose, exc)
        return None
    return runner

