"""Piecewise CUDA graphs for eager steps: everything between two attention calls, captured per
token-count bucket and LoRA variant.

An eager step (prefill chunks, image rows, decodes mixed with prefills) at 7B shapes launches
≈ 400 kernels without LoRA and ≈ 650 with it, and its host time was 1.5–9.8× its GPU time on an
H200 (``docs/gpu.md``, "Eager steps, taken apart"). Between two attention calls a Llama decoder
runs only row-wise work — every output row depends on its own input row alone::

    piece 0      input norm → qkv (+ LoRA) → rotary                          (layer 0)
    piece i      o_proj (+ LoRA) → norm + residual → gate_up (+ LoRA) → SiLU·mul → down (+ LoRA)
                 (layer i-1) → input norm + residual → qkv (+ LoRA) → rotary  (layer i)
    piece L      the tail of layer L-1 → final norm

so those ``L + 1`` pieces are captured once per bucket of tokens (the step's ``T`` padded up to
the smallest bucket ``N ≥ T``) and variant (``base`` / ``lora`` / ``mixed``, as the decode
graphs, ``valora.engine.cuda_graph``), and a step becomes ``L + 1`` replays plus ``L`` eager
attention calls over its real ``T`` tokens and real metadata (variable-length sequences,
chunked prefill and prefix hits are the attention's business, as in the eager path).

Static buffers (sized for the largest bucket) carry the hidden state between pieces: the input
embeddings, ``residual``, the rotated ``q``/``k`` and ``v`` the attention reads, the attention
output the next piece reads, ``cos``/``sin`` (computed eagerly per step, so every RoPE scheme
works, length-dependent ones included), the per-token LoRA slots and the final hidden states.
Intermediates inside a piece live in one graph memory pool shared by every piece: a piece's
outputs land in the static buffers before it ends (the rotary kernel and the residual add write
``q``/``k``/``residual`` there directly, the attention writes its output there; ``v``, a column
slice of the qkv projection, and the final hidden states are copied), so nothing in the pool
outlives the piece that allocated it, and replays of any order are safe.

Padding rows ``T..N`` hold whatever earlier steps left (finite values: earlier embeddings and
attention outputs, zeros at first); every op in a piece is row-wise and their LoRA slot is -1,
which the kernels skip, so they never reach a real row; the attention and everything after the
model (logits, task heads) see rows ``0..T`` only. LoRA tiles are fixed at capture for the
bucket and the worst-case adapter count (segments rebuilt on the device from the static slots
inside piece 0, or just before it where that does not capture), exactly as in decode graphs.

Invariants: the same as ``CudaGraphRunner``'s (KV caches, LoRA slot tensors and weights keep
their storage after ``capture``); the hidden states ``run`` returns are a view of a static
buffer, valid until the next ``run``. With ``use_graphs=False`` (the CPU, tests) the same
pieces run eagerly over the same buffers — the code path every replay takes, minus the graphs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import torch

from valora.engine.cuda_graph import capped_buckets, capture_largest_first, smallest_bucket
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
from valora.models.llama import LlamaDecoderLayer

logger = get_logger(__name__)

DEFAULT_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, *range(640, 4097, 128),
                         *range(4608, 8193, 512))
"""Every 128 tokens from 512 to 4096: a prefill step is GPU-bound once replayed, so padding
costs its share of GPU time (a 700-token base step padded to 768 took 7 % longer on an H200,
``docs/gpu.md``); the first GPU runs used 16 … 512, 768, 1024, 1536, 2048 (1089 graphs at 7B
captured in 2 s by a warm engine, 318 MiB). A bucket is ``layers + 1`` graphs per variant."""


def token_buckets(max_tokens: int, buckets: Iterable[int] = DEFAULT_TOKEN_BUCKETS
                  ) -> tuple[int, ...]:
    """The buckets below ``max_tokens``, plus ``max_tokens`` itself (sorted)."""
    return capped_buckets(max_tokens, buckets, "max_tokens")


def _static_shapes(model: CausalLMBase, size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the model-dtype static buffers of a runner whose largest bucket is ``size``
    (the LoRA slot buffers, two ``[size]`` int32, come on top)."""
    spec = model.spec
    heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    return {"embeds": (size, spec.hidden_size), "residual": (size, spec.hidden_size),
            "hidden": (size, spec.hidden_size), "q": (size, heads, dim),
            "k": (size, kv_heads, dim), "v": (size, kv_heads, dim),
            "attn_out": (size, heads * dim), "cos": (size, dim), "sin": (size, dim)}


def piecewise_static_bytes(model: CausalLMBase, max_tokens: int) -> int:
    """Bytes of the static buffers a runner for ``max_tokens`` allocates (the memory plan)."""
    element = torch.tensor([], dtype=model.dtype).element_size()
    values = sum(math.prod(shape) for shape in _static_shapes(model, max_tokens).values())
    return values * element + 2 * max_tokens * 4


@dataclass
class _Entry:
    """One bucket × variant: its static batch view, LoRA segments and piece graphs."""

    size: int
    batch: ForwardBatch
    segments: list[StaticSegments]
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    update_in_graph: bool = True


class PiecewiseGraphRunner:
    """Captures and replays the row-wise pieces of eager steps (see the module docstring)."""

    # The static buffers, allocated from ``_static_shapes`` (module docstring).
    embeds: torch.Tensor
    residual: torch.Tensor
    hidden: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_out: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        model: CausalLMBase,
        max_tokens: int,
        *,
        num_lora_slots: int = 0,
        variants: Iterable[str] = ("base", "lora"),
        buckets: Iterable[int] = DEFAULT_TOKEN_BUCKETS,
        use_graphs: bool | None = None,
        fuse_correction: bool = False,
    ) -> None:
        self.variants = check_variants(variants, num_lora_slots)
        self.model = model
        self.decoder = model.decoder
        self.layers: list[LlamaDecoderLayer] = [
            cast(LlamaDecoderLayer, layer) for layer in self.decoder.layers]
        self.device = model.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.num_lora_slots = num_lora_slots
        self.fuse_correction = fuse_correction
        self.buckets = token_buckets(max_tokens, buckets)
        self._allocate_static(self.buckets[-1])
        self._entries = {(b, v): self._make_entry(b, v) for b in self.buckets
                         for v in self.variants}
        self._pool: object | None = None
        self.captured = False
        self.num_replays = 0
        """Steps served (replayed, or run through the pieces eagerly without graphs)."""

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    # ----- static state ---------------------------------------------------------------------
    def _allocate_static(self, size: int) -> None:
        dtype, device = self.model.dtype, self.device
        for name, shape in _static_shapes(self.model, size).items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        self.token_slots = torch.full((size,), -1, dtype=torch.int32, device=device)
        self.correction_slots = torch.full((size,), -1, dtype=torch.int32, device=device)
        # Pieces never read the attention metadata or the ids; the batch only carries LoRA.
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        self._no_attn = AttentionMetadata(query_start_loc=empty, seq_lens=empty,
                                          page_table=empty.view(0, 0), slot_mapping=empty.long(),
                                          page_size=1, query_lens_cpu=[], seq_lens_cpu=[])

    def _make_entry(self, size: int, variant: str) -> _Entry:
        ids = torch.zeros(size, dtype=torch.int64, device=self.device)
        batch = ForwardBatch(input_ids=ids, positions=ids, attn=self._no_attn,
                             logits_indices=ids[:0])
        segments = attach_static_lora(batch, variant, self.token_slots[:size],
                                      self.correction_slots[:size], self.num_lora_slots,
                                      self.fuse_correction)
        return _Entry(size, batch, segments)

    # ----- the pieces -----------------------------------------------------------------------
    def _piece(self, entry: _Entry, index: int, update_segments: bool) -> None:
        """Piece ``index`` over the bucket's rows of the static buffers (module docstring)."""
        n, batch, layers = entry.size, entry.batch, self.layers
        if update_segments:
            for segments, slots, correction in entry.segments:
                segments.update(slots, correction_slots=correction)
        residual: torch.Tensor | None
        if index == 0:
            delta, residual = self.embeds[:n], None
        else:
            delta, residual = layers[index - 1].after_attention(self.attn_out[:n],
                                                                self.residual[:n], batch)
        if index == len(layers):
            self.hidden[:n].copy_(self.decoder.final_norm(delta, residual))
            return
        _, _, v, _ = layers[index].before_attention(
            delta, residual, self.cos[:n], self.sin[:n], batch, q_out=self.q[:n],
            k_out=self.k[:n], residual_out=self.residual[:n])
        self.v[:n].copy_(v)  # a column slice of the qkv output: the one copy left

    def _run_piece(self, entry: _Entry, index: int) -> None:
        if entry.graphs:
            entry.graphs[index].replay()
        else:
            self._piece(entry, index, update_segments=index == 0)

    # ----- capture --------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles every kernel configuration) and capture every piece of every bucket
        and variant, largest bucket first."""
        if self.captured:
            return
        if not self.use_graphs:
            self.captured = True
            return
        self._pool = torch.cuda.graph_pool_handle()
        mib = capture_largest_first(self.device, self.buckets, self.variants,
                                    lambda key: self._capture_entry(self._entries[key]))
        self.captured = True
        logger.info("captured %d piecewise graphs (%d pieces × token buckets %s × variants %s):"
                    " %.1f MiB", len(self._entries) * self.num_pieces, self.num_pieces,
                    list(self.buckets), list(self.variants), mib)

    def _capture_entry(self, entry: _Entry) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for index in range(self.num_pieces):
                self._piece(entry, index, update_segments=index == 0)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graphs: list[torch.cuda.CUDAGraph] = []
        update_in_graph = bool(entry.segments)
        for index in range(self.num_pieces):
            graph = torch.cuda.CUDAGraph()
            update = index == 0 and update_in_graph
            try:
                with torch.cuda.graph(graph, pool=self._pool):  # type: ignore[arg-type]
                    self._piece(entry, index, update_segments=update)
            except RuntimeError as exc:
                if not update:
                    raise
                logger.warning("LoRA segment update not capturable (%s); it runs before each "
                               "piecewise replay instead", exc)
                torch.cuda.synchronize(self.device)
                update_in_graph = False
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):  # type: ignore[arg-type]
                    self._piece(entry, index, update_segments=False)
            graphs.append(graph)
        entry.graphs, entry.update_in_graph = graphs, update_in_graph

    # ----- replay ---------------------------------------------------------------------------
    def bucket_for(self, num_tokens: int) -> int | None:
        return smallest_bucket(self.buckets, num_tokens)

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether captured pieces serve ``batch`` (any step of at most the largest bucket's
        tokens whose LoRA variant was captured)."""
        num_tokens = batch.num_tokens
        if not self.captured or num_tokens == 0 or self.bucket_for(num_tokens) is None:
            return False
        return lora_variant_served(batch, self.num_lora_slots, self.fuse_correction,
                                   self.variants)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden]`` of ``batch`` (``can_run`` must hold), the
        same function as ``model.forward(batch)``."""
        hidden = self.try_run(batch)
        if hidden is None:
            raise ValoraError("PiecewiseGraphRunner.run: no captured bucket/variant serves this "
                              "batch")
        return hidden

    def try_run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """``run(batch)`` when ``can_run(batch)``, else None (the step checked once)."""
        return self._replay(batch) if self.can_run(batch) else None

    @torch.inference_mode()
    def _replay(self, batch: ForwardBatch) -> torch.Tensor:
        model, decoder = self.model, self.decoder
        if not model.kv_caches:
            raise ValoraError("bind_kv_caches must be called before forward")
        num_tokens = batch.num_tokens
        size = self.bucket_for(num_tokens)
        assert size is not None
        entry = self._entries[(size, variant_of(batch))]
        self.embeds[:num_tokens].copy_(model.embed(batch))
        cos, sin = decoder.rotary.cos_sin(batch.positions, batch.attn, self.embeds.dtype)
        self.cos[:num_tokens].copy_(cos)
        self.sin[:num_tokens].copy_(sin)
        if entry.segments:
            fill_lora_slots(batch, self.token_slots, self.correction_slots, num_tokens, size)
            if entry.graphs and not entry.update_in_graph:
                for segments, slots, correction in entry.segments:
                    segments.update(slots, correction_slots=correction)
        plan = decoder.backend.plan(batch.attn)
        q, k, v = self.q[:num_tokens], self.k[:num_tokens], self.v[:num_tokens]
        attn_out = self.attn_out[:num_tokens]
        for index, (layer, kv_cache) in enumerate(zip(self.layers, model.kv_caches,
                                                      strict=True)):
            self._run_piece(entry, index)
            layer.self_attn.attend(q, k, v, batch, kv_cache, plan, out=attn_out)
        self._run_piece(entry, len(self.layers))
        self.num_replays += 1
        return self.hidden[:num_tokens]


def capture_piecewise_graphs(
    model: CausalLMBase,
    max_tokens: int,
    *,
    num_lora_slots: int,
    variants: Iterable[str],
    buckets: Iterable[int] = DEFAULT_TOKEN_BUCKETS,
    fuse_correction: bool = False,
    use_graphs: bool | None = None,
) -> PiecewiseGraphRunner | None:
    """A captured ``PiecewiseGraphRunner`` for steps of up to ``max_tokens`` tokens, or None
    (with a warning: eager steps stay eager) where it cannot be built. Without LoRA slots only
    the ``"base"`` variant is captured."""
    wanted = list(variants)
    if num_lora_slots == 0:
        wanted = [v for v in wanted if v == "base"] or ["base"]
    try:
        runner = PiecewiseGraphRunner(model, max_tokens, num_lora_slots=num_lora_slots,
                                      variants=wanted, buckets=buckets, use_graphs=use_graphs,
                                      fuse_correction=fuse_correction)
        runner.capture()
    except ValoraError as exc:
        logger.warning("piecewise CUDA graphs disabled, eager steps run eagerly: %s", exc)
        return None
    return runner


__all__ = ["DEFAULT_TOKEN_BUCKETS", "PiecewiseGraphRunner", "capture_piecewise_graphs",
           "piecewise_static_bytes", "token_buckets"]
