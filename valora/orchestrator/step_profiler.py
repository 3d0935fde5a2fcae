"""Measure the cost model on the running device at the model level (``valora profile-modes``).

Loads the model (``load_format="dummy"`` is fine: only shapes matter), puts one random adapter
per profiling name (``profile-r{rank}-{i}``) in its own LoRA slot on all projections, and for each
:class:`StepSpec` of :func:`profile_grid` builds the step's :class:`ForwardBatch` exactly as the
engine would (rows of ``num_tokens`` new tokens at ``context_tokens`` after the step, per-token
slots through :func:`plan_lora_batches`, the correction launch in mixed mode) and times
``forward`` + ``compute_logits`` (synchronised wall time, median of ``repeats`` after one
warm-up). Switches: a :class:`WeightSwitcher` merges and unmerges adapters targeting all seven
projections, the attention four, and ``q``/``v`` only (three byte counts, so the constant and the
per-byte cost separate). The fit is :func:`fit_cost_model`.

Decode steps are timed the way the engine runs them: on CUDA (attention backend capturable) a
:class:`CudaGraphRunner` captures the base, LoRA and mixed variants over batch buckets once and
decode specs replay them (``graphs=False`` or a runner that cannot capture: eager forwards);
the other steps replay piecewise graphs (``valora.engine.piecewise_graphs``) unless
``piecewise=False``, as the engine runs them with ``ModelConfig.prefill_graphs``.
The first profile on an H200 timed eager forwards: a 13.8 ms step constant and 16 ms for a step
with any LoRA launch, against 7 ms and +1.3–3.9 ms under graphs (``bench/results/model``) — a
cost model that overstated the unmerged mode fourfold and had the policy switch modes far more
than it pays. Profiles are stored per GPU (:func:`default_profile_path`) and, inside the file, per model
shape (:func:`profile_key`): a profile of one model is never applied to another.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from valora.config import LoRAConfig
from valora.engine.cuda_graph import (
    CudaGraphRunner,
    capture_decode_graphs,
    few_adapter_captures,
)
from valora.engine.piecewise_graphs import PiecewiseGraphRunner, capture_piecewise_graphs
from valora.errors import ValoraError
from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.logger import get_logger
from valora.ops.lora import prepare_lora_batch
from valora.orchestrator.cost_model import CostModel, StepSpec
from valora.orchestrator.merge import WeightSwitcher
from valora.orchestrator.modes import plan_lora_batches
from valora.orchestrator.profiling import adapter_name, profile, profile_grid

_log = get_logger(__name__)
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
PAGE_SIZE = 16
SWITCH_TARGETS: dict[str, tuple[str, ...]] = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
}


def device_label(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA, else ``"cpu"`` (the key profiles are stored by)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_profile_path(device_name: str, directory: Path = PROFILES_DIR) -> Path:
    """``profiles/<device name, non-alphanumerics as _>.json`` (``NVIDIA H200`` →
    ``NVIDIA_H200.json``)."""
    return directory / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def model_signature(spec: Any) -> str:
    """The model shape a profile belongs to (decoder sizes; the vision tower is not profiled)."""
    return (f"h{spec.hidden_size}-i{spec.intermediate_size}-l{spec.num_layers}"
            f"-q{spec.num_heads}-kv{spec.num_kv_heads}-d{spec.head_dim}")


def profile_key(device_name: str, signature: str) -> str:
    """Entry name inside a profile file: device and model shape."""
    return f"{device_name} | {signature}"


def load_profile(device_name: str, signature: str, path: str | Path | None = None,
                 directory: Path = PROFILES_DIR) -> CostModel | None:
    """The profiled cost model for this device and model shape, or ``None`` when there is none.

    ``path`` (an explicit file) must hold an entry for the device: ``profile_key(device,
    signature)`` first, else a plain ``device_name`` entry (hand-made or older files); a missing
    entry there is an error (``ValoraError``). Without ``path`` the per-GPU default file is read
    if it exists, and a missing file or entry gives ``None`` (the caller's analytic prior)."""
    explicit = path is not None
    file = Path(path) if path is not None else default_profile_path(device_name, directory)
    if not file.exists():
        if explicit:
            raise ValoraError(f"cost model file {file} does not exist")
        return None
    for key in (profile_key(device_name, signature), device_name):
        try:
            return CostModel.load(file, key)
        except ValoraError as exc:
            if "no cost model for device" not in str(exc):
                raise
    if explicit:
        raise ValoraError(f"{file} has no cost model for {device_name!r} / {signature}")
    return None


@dataclass
class _Pool:
    """Pages handed out per step (contents random; reset before each step)."""

    num_pages: int
    next_page: int = 1

    def take(self, count: int) -> list[int]:
        pages = list(range(self.next_page, self.next_page + count))
        self.next_page += count
        if self.next_page > self.num_pages:
            raise ValoraError("profiling KV pool exhausted")
        return pages


class StepProfiler:
    """Builds and times steps of ``model`` (already loaded, LoRA slots initialised here)."""

    def __init__(self, model: Any, names: Sequence[str], ranks: dict[str, int],
                 targets: dict[str, tuple[str, ...]], lora_backend: str, num_pages: int,
                 seed: int = 0, fuse_correction: bool = False) -> None:
        """``fuse_correction``: mixed steps carry the correction inside their one LoRA batch
        (``LoRAConfig.fuse_correction``), as the engine then builds them."""
        self.model = model
        self.fuse_correction = fuse_correction
        self.device: torch.device = model.device
        self.slot_of = {name: slot for slot, name in enumerate(names)}
        self.lora_backend = lora_backend
        model.init_lora(len(names), max(ranks.values()))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        slot_map = model.lora_slot_map()
        seen: set[int] = set()
        for (_, module), (weights, j) in slot_map.items():
            if id(weights) not in seen:
                seen.add(id(weights))
                weights.lora_a.normal_(0.0, 0.02, generator=generator)
                weights.lora_b.normal_(0.0, 0.02, generator=generator)
            for name, slot in self.slot_of.items():
                rank = ranks[name] if module in targets[name] else 0
                weights.ranks[slot, j] = rank
                weights.scales[slot, j] = 2.0
                weights.ranks_cpu[slot][j] = rank
        shape = model.kv_cache_shape(num_pages, PAGE_SIZE)
        caches = []
        for _ in range(model.spec.num_layers):
            k = torch.empty(shape, dtype=model.dtype, device=self.device).normal_(
                0.0, 1.0, generator=generator)
            caches.append((k, torch.empty_like(k).normal_(0.0, 1.0, generator=generator)))
        model.bind_kv_caches(caches)
        self.num_pages = num_pages
        self._batches: dict[StepSpec, ForwardBatch] = {}
        self._switcher: WeightSwitcher | None = None
        self._warm_switch_targets: set[str] = set()
        self.graphs: CudaGraphRunner | None = None
        self.piecewise: PiecewiseGraphRunner | None = None
        self.num_graph_steps = 0

    def enable_cuda_graphs(self, max_batch: int, max_context: int,
                           lora: LoRAConfig | None = None) -> bool:
        """Capture decode graphs (base, LoRA, mixed, and the few-adapter captures of ``lora``,
        default ``LoRAConfig()``) as the engine does; False (eager forwards, with a warning)
        where the runner cannot serve this model or device."""
        if self.device.type != "cuda":
            return False
        few_buckets, few_max = few_adapter_captures(lora or LoRAConfig(), self.device)
        self.graphs = capture_decode_graphs(
            self.model, max_batch, max_context=max_context, page_size=PAGE_SIZE,
            num_lora_slots=len(self.slot_of), variants=("base", "lora", "mixed"),
            purpose="profiling decode steps eagerly", fuse_correction=self.fuse_correction,
            few_adapter_buckets=few_buckets, few_adapter_max=few_max)
        return self.graphs is not None

    def enable_piecewise_graphs(self, max_tokens: int) -> bool:
        """Capture piecewise graphs for the other steps (base, LoRA, mixed) as the engine does
        (``ModelConfig.prefill_graphs``); False (eager forwards) off CUDA or where they cannot
        be built."""
        if self.device.type != "cuda":
            return False
        self.piecewise = capture_piecewise_graphs(
            self.model, max_tokens, num_lora_slots=len(self.slot_of),
            variants=("base", "lora", "mixed"), fuse_correction=self.fuse_correction)
        return self.piecewise is not None

    def batch(self, spec: StepSpec) -> ForwardBatch:
        """The step's batch (built once per spec)."""
        if spec in self._batches:
            return self._batches[spec]
        device, pool = self.device, _Pool(self.num_pages)
        tables, slot_mapping, positions, token_slots = [], [], [], []
        for row in spec.rows:
            if row.num_tokens > row.context_tokens:
                raise ValoraError(f"row with {row.num_tokens} tokens > context {row.context_tokens}")
            table = pool.take(-(-row.context_tokens // PAGE_SIZE))
            tables.append(table)
            for position in range(row.context_tokens - row.num_tokens, row.context_tokens):
                positions.append(position)
                slot_mapping.append(table[position // PAGE_SIZE] * PAGE_SIZE
                                    + position % PAGE_SIZE)
            slot = self.slot_of[row.adapter] if row.adapter is not None else -1
            token_slots += [slot] * row.num_tokens
        query_lens = [row.num_tokens for row in spec.rows]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        width = max(len(t) for t in tables)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([r.context_tokens for r in spec.rows], dtype=torch.int32,
                                  device=device),
            page_table=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                    dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            page_size=PAGE_SIZE, query_lens_cpu=query_lens,
            seq_lens_cpu=[r.context_tokens for r in spec.rows])
        ids = torch.randint(0, max(2, self.model.spec.vocab_size - 1), (len(positions),),
                            generator=torch.Generator().manual_seed(len(positions)))
        batch = ForwardBatch(input_ids=ids.to(device),
                             positions=torch.tensor(positions, device=device), attn=attn,
                             logits_indices=torch.tensor(starts[1:], device=device) - 1)
        merged_slot = (self.slot_of[spec.merged_adapter]
                       if spec.mode.has_merged_adapter and spec.merged_adapter is not None
                       else None)
        lora_slots, correction = plan_lora_batches(token_slots, merged_slot, mode=spec.mode)
        if correction is not None and self.fuse_correction:
            batch.lora = self._lora_batch(lora_slots, correction, merged_slot)
        else:
            if any(s >= 0 for s in lora_slots):
                batch.lora = self._lora_batch(lora_slots)
            if correction is not None:
                batch.lora_correction = self._lora_batch(correction)
        self._batches[spec] = batch
        return batch

    def _lora_batch(self, token_slots: list[int], correction: list[int] | None = None,
                    merged_slot: int | None = None) -> Any:
        """LoRA metadata on the model's device (``"auto"`` resolves by that device, as in the
        engine: Triton on CUDA), with the correction inside when given."""
        slots = torch.tensor(token_slots, dtype=torch.int32, device=self.device)
        active = {s for s in token_slots if s >= 0}
        corrected = (torch.tensor(correction, dtype=torch.int32, device=self.device)
                     if correction is not None else None)
        return prepare_lora_batch(slots, len(self.slot_of), self.lora_backend,
                                  active_slots=active, correction_slots=corrected,
                                  correction_slot=merged_slot)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure_step(self, spec: StepSpec) -> float:
        """Seconds of one forward + logits of ``spec`` (first call per spec also warms up)."""
        fresh = spec not in self._batches
        batch = self.batch(spec)
        with torch.inference_mode():
            if fresh:
                self._run(batch)
            self._sync()
            start = time.perf_counter()
            self._run(batch)
            self._sync()
        return time.perf_counter() - start

    def _run(self, batch: ForwardBatch) -> torch.Tensor:
        """Forward (a graph replay for decode steps when graphs are captured), then logits of
        the sampled positions only (as the engine does)."""
        if self.graphs is not None and self.graphs.can_run(batch):
            self.num_graph_steps += 1
            return self.model.compute_logits(self.graphs.run(batch))
        piecewise = self.piecewise
        if piecewise is not None and piecewise.can_run(batch):
            hidden = piecewise.run(batch)
        else:
            hidden = self.model.forward(batch)
        if hidden.shape[0] != batch.logits_indices.numel():
            hidden = hidden[batch.logits_indices]
        return self.model.compute_logits(hidden)

    def measure_switch(self, target: str) -> tuple[int, float]:
        """``(bytes, seconds)`` of one merge or unmerge (mean of a timed merge and unmerge) of
        the rank-16 adapter targeting ``SWITCH_TARGETS[target]``. The first call per target
        also merges and unmerges once untimed (as :meth:`measure_step` warms up): the first
        switch compiles the merge kernels for the target's weight shapes and allocates the
        pristine copies — on an H200 it took 10x a warm switch, which, counted, made the fitted
        switch cost 10x too high and the mode policy all but stop switching."""
        if self._switcher is None:
            self._switcher = WeightSwitcher(self.model.lora_base_weights(),
                                            self.model.lora_slot_map())
        slot = self.slot_of[f"profile-switch-{target}"]
        if target not in self._warm_switch_targets:
            self._switcher.merge(slot, target)
            self._switcher.unmerge()
            self._sync()
            self._warm_switch_targets.add(target)
        seconds = []
        for op in ("merge", "unmerge"):
            self._sync()
            start = time.perf_counter()
            report = (self._switcher.merge(slot, target) if op == "merge"
                      else self._switcher.unmerge())
            self._sync()
            seconds.append(time.perf_counter() - start)
        return report.weight_bytes, statistics.fmean(seconds)


def grid_for(quick: bool) -> tuple[list[StepSpec], tuple[int, ...]]:
    """The profiling grid (``quick``: tiny, for CPU tests) and its ranks."""
    ranks: tuple[int, ...] = (4, 8) if quick else (8, 16, 64)
    if quick:
        return profile_grid(ranks, row_counts=(1, 4), prefill_tokens=(16,),
                            adapter_counts=(1, 2), context_tokens=(16, 40)), ranks
    return profile_grid(ranks), ranks


def run_profile(model: Any, *, quick: bool = False, repeats: int = 3,
                lora_backend: str = "auto", graphs: bool = True,
                samples: list[dict[str, object]] | None = None,
                fuse_correction: bool = False, piecewise: bool = True) -> CostModel:
    """Profile ``model`` (loaded, on its device) and return the fitted model, keyed by
    :func:`profile_key`. ``graphs``: replay decode steps from CUDA graphs where the device and
    model allow (module docstring). ``samples`` receives the fitted samples (``profile``).
    ``fuse_correction``: mixed steps as an engine with ``LoRAConfig.fuse_correction`` runs them
    (the returned model has ``fused_correction`` set; profiles do not store it — the engine sets
    it from its own configuration). ``piecewise`` (with ``graphs``): other steps replay
    piecewise graphs, as an engine with ``ModelConfig.prefill_graphs`` runs them."""
    specs, _ = grid_for(quick)
    names: list[str] = []
    ranks: dict[str, int] = {}
    targets: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        for row in spec.rows:
            if row.adapter is not None and row.adapter not in ranks:
                names.append(row.adapter)
                ranks[row.adapter], targets[row.adapter] = row.rank, SWITCH_TARGETS["all"]
    for target, modules in SWITCH_TARGETS.items():
        name = f"profile-switch-{target}"
        names.append(name)
        ranks[name], targets[name] = 16, modules
    pages = max(sum(-(-row.context_tokens // PAGE_SIZE) for row in spec.rows) for spec in specs)
    profiler = StepProfiler(model, names, ranks, targets, lora_backend, pages + 2,
                            fuse_correction=fuse_correction)
    if graphs:
        decode = [spec for spec in specs if all(row.num_tokens == 1 for row in spec.rows)]
        if decode:
            profiler.enable_cuda_graphs(
                max(len(spec.rows) for spec in decode),
                max(row.context_tokens for spec in decode for row in spec.rows))
        if piecewise:
            profiler.enable_piecewise_graphs(
                max(sum(row.num_tokens for row in spec.rows) for spec in specs))
    device_name = device_label(model.device)
    started = time.perf_counter()
    cost = profile(profiler.measure_step, specs,
                   device_name=profile_key(device_name, model_signature(model.spec)),
                   repeats=repeats, switch_cases=list(SWITCH_TARGETS),
                   measure_switch=profiler.measure_switch, samples=samples,
                   graph_max_rows=profiler.graphs.buckets[-1] if profiler.graphs else 0,
                   fused_correction=fuse_correction)
    _log.info("profiled %d steps in %.1f s (%d timed runs replayed CUDA graphs)", len(specs),
              time.perf_counter() - started, profiler.num_graph_steps)
    return cost


__all__ = ["PROFILES_DIR", "StepProfiler", "adapter_name", "default_profile_path", "device_label",
           "grid_for", "load_profile", "model_signature", "profile_key", "run_profile"]
