"""Connect a mode policy (``valora.orchestrator``) to the engine: each step it snapshots the
queues, asks the policy for a mode, merged adapter and batch, switches the weights in place and
tells the scheduler which requests may run.

Correctness never depends on the decision: a step is computed with mixed-mode semantics whenever
an adapter is merged (rows of the merged adapter add nothing, every other row adds its own delta
and subtracts the merged one), which equals merged mode when only the merged adapter's rows run.
So a policy that admits the "wrong" rows costs speed, never outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from valora.config import EngineConfig
from valora.engine.scheduler_output import ScheduledRequest
from valora.errors import InvalidRequestError
from valora.logger import get_logger
from valora.lora.adapter_manager import AdapterManager
from valora.orchestrator.calibration import StepCalibration
from valora.orchestrator.cost_model import CostModel, RowWork, StepSpec
from valora.orchestrator.merge import WeightSwitcher
from valora.orchestrator.modes import Mode, ModeState
from valora.orchestrator.policies import ModePolicy, available_mode_policies, get_mode_policy
from valora.orchestrator.queue_view import AdapterInfo, ModeDecision, QueueView, views_from_requests
from valora.orchestrator.step_profiler import (
    PROFILES_DIR,
    default_profile_path,
    device_label,
    load_profile,
    model_signature,
)
from valora.orchestrator.transition import apply_decision
from valora.request import Request

logger = get_logger(__name__)


def analytic_cost_model(model: Any, device: torch.device) -> CostModel:
    """A first-principles prior (bytes over bandwidth, flops over rate) for when no profile of
    this device exists. Rates are conservative round numbers for the device type, not measured."""
    spec = model.spec
    element = next(model.parameters()).element_size()
    bandwidth, flops, launch = (
        (3.0e12, 4.0e14, 5e-6) if device.type == "cuda" else (2.0e10, 5.0e10, 2e-5)
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = weight_bytes / element
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    lora_width = spec.hidden_size * 5 + q + 2 * kv + 3 * spec.intermediate_size  # Σ (in + out)
    lora_width_all = spec.num_layers * lora_width
    step = {
        "const": weight_bytes / bandwidth,
        "num_tokens": 2 * params / flops,
        "context_tokens": 2 * spec.num_layers * kv * element / bandwidth,
        "attention_pairs": 4 * spec.num_layers * q / flops,
        "lora_token_rank": 2 * lora_width_all / flops,
        "lora_segment_rank": lora_width_all * element / bandwidth,
        "lora_segments": 1e-6,
        "lora_launches": launch * spec.num_layers * 4,
    }
    return CostModel(f"analytic:{device.type}", step, {"const": 1e-4, "bytes": 2.0 / bandwidth})


def merging_policy(config: EngineConfig) -> bool:
    """Whether the configured mode policy can ever merge an adapter into the weights."""
    return config.orchestrator.mode_policy != "unmerged-fcfs"


def build_switcher(config: EngineConfig, model: Any, warm_up: bool = True) -> WeightSwitcher:
    """The engine's ``WeightSwitcher`` (pristine copy taken now) with its merge kernels compiled.

    The engine builds it before sizing the KV cache when the policy can merge, so the memory
    plan sees the pristine copy (a copy of every adapted weight: 12.95 GB at LLaVA-1.5-7B shapes
    with all seven projections) instead of meeting it at the first switch, and the first switch
    pays neither the copy nor a kernel compile (in the H200 serving grid the first run's 19
    switches took 1.25 s, the next run's 15 took 0.27 s in the same process)."""
    switcher = WeightSwitcher(
        model.lora_base_weights(),
        model.lora_slot_map(),
        restore=config.orchestrator.restore,
    )
    launches = switcher.warm_up() if warm_up else 0
    logger.info(
        "mode switching enabled: pristine copy of adapted weights %.1f MiB on %s, %d merge "
        "kernel variants compiled",
        switcher.pristine_bytes / 2**20,
        switcher.pristine_device,
        launches,
    )
    return switcher


def select_cost_model(model: Any, device: torch.device, path: str | None = None,
                      directory: Path = PROFILES_DIR) -> CostModel:
    """The cost model the ``valora`` policy uses on ``device`` for ``model``.

    A profile (``valora profile-modes``) for this device and model shape wins: from ``path`` when
    given (it must hold one: ``ValoraError`` otherwise), else from the per-GPU file in
    ``directory`` if that exists. Without one, :func:`analytic_cost_model` (a prior)."""
    device_name = device_label(device)
    profiled = load_profile(device_name, model_signature(model.spec), path, directory)
    if profiled is not None:
        logger.info("mode cost model: profile %r", profiled.device_name)
        return profiled
    logger.info("mode cost model: analytic prior (no profile for %s / %s in %s)", device_name,
                model_signature(model.spec), default_profile_path(device_name, directory))
    return analytic_cost_model(model, device)


@dataclass
class ModeStats:
    num_switches: int = 0
    switch_seconds: float = 0.0
    switch_bytes: int = 0
    steps_by_mode: dict[str, int] = field(default_factory=dict)
    decision_seconds: float = 0.0
    """Host time of building the queue view and the policy's decisions (switches excluded)."""


class ModeController:
    """Owns the mode state, the weight switcher and the merged adapter's pin."""

    def __init__(
        self,
        config: EngineConfig,
        model: Any,
        adapters: AdapterManager,
        device: torch.device,
        switcher: WeightSwitcher | None = None,
        graph_max_rows: int = 0,
    ) -> None:
        """``graph_max_rows``: the largest decode batch this engine replays as a CUDA graph (0 =
        none); the cost model charges every other step as eager whatever its profile recorded."""
        orchestrator = config.orchestrator
        self.graph_max_rows = graph_max_rows
        self.config = config
        self.model = model
        self.adapters = adapters
        self.state = ModeState()
        self.stats = ModeStats()
        self._last_progress: dict[str, float] = {}
        self._merge_bytes: dict[str, int] = {}
        self.cost_model_source: str | None = None
        self.policy: ModePolicy = self._build_policy(orchestrator.mode_policy, model, device)
        self.switcher: WeightSwitcher | None = switcher
        self._can_merge = merging_policy(config) and adapters.num_slots > 0

    def _build_policy(self, name: str, model: Any, device: torch.device) -> ModePolicy:
        orchestrator = self.config.orchestrator
        if name != "valora":
            options: dict[str, object] = (
                {} if name == "unmerged-fcfs" else {"starvation_s": orchestrator.starvation_s}
            )
            return get_mode_policy(name, **options)
        cost_model = replace(select_cost_model(model, device, orchestrator.cost_model_path),
                             graph_max_rows=self.graph_max_rows,
                             fused_correction=self.config.lora.fuse_correction)
        self.cost_model_source = cost_model.device_name
        return get_mode_policy(
            "valora",
            cost_model=cost_model,
            starvation_s=orchestrator.starvation_s,
            default_latency_target_s=orchestrator.latency_target_s,
            calibration=StepCalibration() if orchestrator.calibrate_cost_model else None,
        )

    @property
    def merged_slot(self) -> int | None:
        return self.state.merged_slot

    def set_policy(self, name: str) -> None:
        """Decide with policy ``name`` from the next step on (benchmarks compare policies on one
        engine). Call only while no request is running or waiting (``LLMEngine.set_mode_policy``
        checks). A merged adapter is unmerged first (exact restore), so every policy starts from
        the base weights; the statistics keep counting (runs report differences). A policy that
        merges needs an engine started with one: its switcher and pristine copy are planned
        into memory and its graphs captured with the ``mixed`` variant at start."""
        if name not in available_mode_policies():
            raise InvalidRequestError(
                f"unknown mode policy {name!r}; known: {available_mode_policies()}")
        merges = name != "unmerged-fcfs"
        if merges and not merging_policy(self.config):
            raise InvalidRequestError(
                f"mode policy {name!r} merges adapters, but this engine was started with "
                f"{self.config.orchestrator.mode_policy!r}, which never does (no switcher or "
                "pristine copy planned, no mixed graphs): start it with a merging policy")
        if self.state.merged_adapter is not None:  # a switch like any other (counted, timed)
            self._switch_to(ModeDecision(Mode.UNMERGED, None), time.monotonic())
        self.policy = self._build_policy(name, self.model, self.model.device)
        self._can_merge = merges and self.adapters.num_slots > 0
        self._last_progress.clear()

    # ----- per step -----------------------------------------------------------------------------
    def before_schedule(
        self, running: list[Request], waiting: list[Request], now: float
    ) -> Callable[[Request], bool] | None:
        """Decide this step; switch weights if needed; return the scheduler's ``allow`` filter."""
        if not self._can_merge or not (running or waiting):
            return None
        started = time.perf_counter()
        view = self._view(running, waiting)
        decision = self.policy.decide(view, self.state, now)
        self.stats.decision_seconds += time.perf_counter() - started
        self._switch_to(decision, now)
        mode = self.state.mode.value
        self.stats.steps_by_mode[mode] = self.stats.steps_by_mode.get(mode, 0) + 1
        allowed = {r.request_id for r in running} - set(decision.deferred) | set(decision.admitted)
        return lambda request: request.request_id in allowed

    def after_step(self, request_ids: list[str], now: float) -> None:
        for request_id in request_ids:
            self._last_progress[request_id] = now

    def observe_step(self, scheduled: Sequence[ScheduledRequest], seconds: float,
                     graphed: bool) -> None:
        """Report an executed step to a policy that learns from them (the ``valora`` policy's
        cost-model calibration): its rows as the cost model sees them, under the mode it ran in."""
        observe = getattr(self.policy, "observe_step", None)
        if observe is None or not scheduled:
            return
        rows = tuple(
            RowWork(item.request.adapter_name,
                    self.adapters.rank_of(item.request.adapter_name)
                    if item.request.adapter_name is not None else 0,
                    item.num_new_tokens, item.num_computed_tokens + item.num_new_tokens)
            for item in scheduled)
        merged = self.state.merged_adapter
        rank = self.adapters.rank_of(merged) if merged is not None else 0
        # Computed with mixed semantics whenever an adapter is merged (= merged mode's cost when
        # only its rows ran; the scheduler's fallback may have run others).
        observe(StepSpec(rows, self.mode_for_compute(), merged, rank), seconds, graphed)

    def forget(self, request_id: str) -> None:
        self._last_progress.pop(request_id, None)

    # ----- internals ----------------------------------------------------------------------------
    def _view(self, running: list[Request], waiting: list[Request]) -> QueueView:
        names = {r.adapter_name for r in running + waiting if r.adapter_name is not None}
        ranks = {name: self.adapters.rank_of(name) for name in names}
        infos = {name: AdapterInfo(ranks[name], self._bytes_of(name)) for name in names}
        scheduler = self.config.scheduler
        return QueueView(
            running=views_from_requests(running, ranks, self._last_progress),
            waiting=views_from_requests(waiting, ranks, self._last_progress),
            free_seats=max(0, scheduler.max_num_seqs - len(running)),
            token_budget=scheduler.max_num_batched_tokens,
            max_active_adapters=self.adapters.num_slots,
            adapters=infos,
        )

    def _bytes_of(self, name: str) -> int:
        digest = self.adapters.digest(name)
        if digest not in self._merge_bytes:
            weights = self.model.lora_base_weights()
            modules = self.adapters.resolve(name).modules
            self._merge_bytes[digest] = sum(
                weights[key].numel() * weights[key].element_size()
                for key in modules
                if key in weights
            )
        return self._merge_bytes[digest]

    def _switch_to(self, decision: ModeDecision, now: float) -> None:
        target = decision.merged_adapter if decision.mode.has_merged_adapter else None
        previous = self.state.merged_adapter
        if target is not None and target != previous and self.adapters.acquire(target) is None:
            logger.debug(
                "cannot pin %r to merge it (all slots pinned); staying %s",
                target,
                self.state.mode.value,
            )
            return
        if self.switcher is None:
            self.switcher = build_switcher(self.config, self.model)
        started = time.perf_counter()
        self.state, report = apply_decision(
            self.switcher, self.state, decision, self._pinned_slot, now
        )
        if report.num_modules:
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)  # switches are rare: time them truly
            self.stats.switch_seconds += time.perf_counter() - started
            self.stats.num_switches += 1
            self.stats.switch_bytes += report.weight_bytes
            logger.debug(
                "mode %s, merged %r (%d modules)", self.state.mode.value, target, report.num_modules
            )
        if previous is not None and previous != self.state.merged_adapter:
            self.adapters.release(previous)

    def _pinned_slot(self, name: str) -> int:
        slot = self.adapters.slot_of(name)
        if slot is None:
            raise RuntimeError(f"adapter {name!r} is being merged but holds no slot")
        self.adapters.wait_for_slots([slot])  # the merge reads the slot: after its prefetch
        return slot

    def mode_for_compute(self) -> Mode:
        """Mixed semantics whenever an adapter is merged (see the module docstring)."""
        return Mode.UNMERGED if self.state.merged_slot is None else Mode.MIXED

    def summary(self) -> dict[str, Any]:
        calibration: StepCalibration | None = getattr(self.policy, "calibration", None)
        return {
            "policy": self.policy.name,
            "mode": self.state.mode.value,
            "merged_adapter": self.state.merged_adapter,
            "num_switches": self.stats.num_switches,
            "switch_bytes": self.stats.switch_bytes,
            "switch_seconds": self.stats.switch_seconds,
            "steps_by_mode": dict(self.stats.steps_by_mode),
            "decision_seconds": self.stats.decision_seconds,
            "cost_scales": (None if calibration is None else
                            {"eager": calibration.eager_scale,
                             "graph": calibration.graph_scale,
                             "observed": list(calibration.num_observations)}),
            "pristine_bytes": self.switcher.pristine_bytes if self.switcher is not None else 0,
        }
