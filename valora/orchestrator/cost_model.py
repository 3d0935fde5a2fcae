"""Per-device cost model: iteration time per mode and batch shape, and mode-switch time.

A step is described by :class:`StepSpec` (its rows, the mode and the merged adapter); its cost
features (:class:`StepShape`) follow from the mode's LoRA work (``plan_lora_batches`` semantics):
rows of the merged adapter pay no LoRA; other adapter rows pay their own rank and, in mixed mode,
the merged adapter's rank again for the correction launch; base rows pay only the correction. ::

    t_step   = c_const + c_tokens·num_tokens + c_rows·num_rows + c_context·context_tokens
             + c_attention·attention_pairs
             + c_lora·Σ_segments tokens·rank + c_segment_rank·Σ_segments rank
             + c_segment·num_segments + c_launch·num_launches
             + eager·(c_eager + c_eager_launch·num_launches)
    t_switch = s_const + s_byte·bytes      (one merge or one unmerge of that many weight bytes)

``eager`` is 1 for a step no CUDA graph serves: one with a row computing more than one token (a
prefill or a chunk) or more rows than the largest captured decode graph (``graph_max_rows``; 0 =
the device replays no graphs, every step is eager). An eager step pays the host's per-kernel
launch work, and every LoRA launch of it pays that for its two kernels in each of the model's
LoRA-targeted layers: on an H200 at 7B shapes ≈ 8 ms per eager step plus ≈ 18 ms per LoRA launch,
against ≈ 1.4 ms per launch in a graph replay — a term no linear mix of the other features can
stand in for (the graph-era fit without it was off by 35 % RMS, mostly on exactly these steps).

A *segment* is one adapter's group of rows in one LoRA launch (the correction launch is one
segment of the merged adapter); ``Σ_segments rank`` tracks adapter weight bytes read, which
dominate LoRA cost at decode sizes. ``context_tokens`` is ``Σ_rows context`` (K/V bytes read, the
memory-bound part of attention) and ``attention_pairs`` ``Σ_rows new_tokens · context`` (the
compute-bound part, quadratic in a prefill). Coefficients are fitted by non-negative least
squares on relative error from profiled samples (``valora.orchestrator.profiling``) and stored in
JSON keyed by device name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from valora.errors import ValoraError
from valora.orchestrator.modes import Mode

STEP_FEATURES = ("const", "num_tokens", "num_rows", "context_tokens", "attention_pairs",
                 "lora_token_rank", "lora_segment_rank", "lora_segments", "lora_launches",
                 "eager", "eager_lora_launches")
SWITCH_FEATURES = ("const", "bytes")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RowWork:
    """One sequence's share of a step: its adapter (``None`` = base model) and rank, the new
    tokens it computes this step and its context length after the step."""

    adapter: str | None
    rank: int
    num_tokens: int
    context_tokens: int


@dataclass(frozen=True)
class StepSpec:
    """A step to cost (or to measure while profiling): rows, mode and merged adapter + rank."""

    rows: tuple[RowWork, ...]
    mode: Mode = Mode.UNMERGED
    merged_adapter: str | None = None
    merged_rank: int = 0


@dataclass(frozen=True)
class StepShape:
    """The cost features of one step (see module docstring)."""

    num_tokens: int
    num_rows: int
    context_tokens: int
    attention_pairs: int
    lora_token_rank: int
    lora_segment_rank: int
    lora_segments: int
    lora_launches: int
    eager: int = 1

    def features(self) -> list[float]:
        return [1.0, self.num_tokens, self.num_rows, self.context_tokens, self.attention_pairs,
                self.lora_token_rank, self.lora_segment_rank, self.lora_segments,
                self.lora_launches, self.eager, self.eager * self.lora_launches]


def is_eager(rows: tuple[RowWork, ...], graph_max_rows: int) -> bool:
    """Whether no decode graph serves a step of ``rows`` (see the module docstring)."""
    return (graph_max_rows <= 0 or len(rows) > graph_max_rows
            or any(row.num_tokens != 1 for row in rows))


def lora_rank_per_token(adapter: str | None, rank: int, mode: Mode, merged_adapter: str | None,
                        merged_rank: int) -> int:
    """LoRA work per token of a row under ``mode``: 0 for the merged adapter's rows, its own rank
    plus the merged adapter's (correction) for other rows while merged, its own rank unmerged."""
    if not mode.has_merged_adapter:
        return rank if adapter is not None else 0
    if adapter == merged_adapter:
        return 0
    return (rank if adapter is not None else 0) + merged_rank


def lora_launches_per_row(adapter: str | None, rank: int, mode: Mode,
                          merged_adapter: str | None, fused_correction: bool = False) -> int:
    """LoRA launches a step of this one row makes under ``mode`` (as :func:`step_shape` counts
    them): none for the merged adapter's rows, its own plus the correction for other rows
    while an adapter is merged (one launch for both with ``fused_correction``), its own
    unmerged."""
    own = int(adapter is not None and rank > 0)
    if not mode.has_merged_adapter:
        return own
    if adapter == merged_adapter:
        return 0
    return 1 if fused_correction else own + 1


def step_shape(spec: StepSpec, graph_max_rows: int = 0,
               fused_correction: bool = False) -> StepShape:
    """Features of ``spec`` under its mode (merged rows free, corrections charged); decode steps
    of at most ``graph_max_rows`` rows are graph replays (``eager`` 0). ``fused_correction``:
    the rows' own adapters and the correction are one launch (``LoRAConfig.fuse_correction``,
    eager steps and graph replays alike)."""
    merged = spec.merged_adapter if spec.mode.has_merged_adapter else None
    if spec.mode.has_merged_adapter and merged is None:
        raise ValoraError(f"{spec.mode.value} step needs a merged adapter")
    own: dict[str, int] = {}  # adapter -> rank, for adapters with rows in the main launch
    work = 0
    corrected = 0
    for row in spec.rows:
        if merged is not None and row.adapter == merged:
            continue
        if spec.mode is Mode.MERGED:
            raise ValoraError(f"merged step on {merged!r} has a row of {row.adapter!r}")
        if row.adapter is not None and row.rank > 0:
            own[row.adapter] = row.rank
            work += row.num_tokens * row.rank
        if merged is not None:
            corrected += row.num_tokens
    correction = int(corrected > 0)
    eager = is_eager(spec.rows, graph_max_rows)
    launches = int(bool(own) or correction) if fused_correction else int(bool(own)) + correction
    return StepShape(
        num_tokens=sum(r.num_tokens for r in spec.rows),
        num_rows=len(spec.rows),
        context_tokens=sum(r.context_tokens for r in spec.rows),
        attention_pairs=sum(r.num_tokens * r.context_tokens for r in spec.rows),
        lora_token_rank=work + corrected * spec.merged_rank,
        lora_segment_rank=sum(own.values()) + correction * spec.merged_rank,
        lora_segments=len(own) + correction,
        lora_launches=launches,
        eager=int(eager),
    )


@dataclass(frozen=True)
class CostModel:
    """Fitted step and switch costs for one device (all coefficients in seconds per unit).

    ``graph_max_rows``: the largest decode batch the profiled engine replayed as a CUDA graph
    (0: none); decides which steps :meth:`step_time` charges as eager."""

    device_name: str
    step_coefficients: dict[str, float]
    switch_coefficients: dict[str, float]
    fit_info: dict[str, float] = field(default_factory=dict)
    graph_max_rows: int = 0
    fused_correction: bool = False
    """Whether the engine's mixed-mode steps make one LoRA launch (``step_shape``); a property
    of the engine, set by it like ``graph_max_rows``, not stored in profiles."""
    eager_scale: float = 1.0
    """Factor on every eager-step prediction (steps, prefill tokens, eager overheads): what the
    running engine's eager steps measure against the profile (``valora.orchestrator.
    calibration``); not stored in profiles."""
    graph_scale: float = 1.0
    """Factor on graph-replayed step predictions, likewise."""

    def __post_init__(self) -> None:
        for names, coefficients in ((STEP_FEATURES, self.step_coefficients),
                                    (SWITCH_FEATURES, self.switch_coefficients)):
            unknown = set(coefficients) - set(names)
            if unknown:
                raise ValoraError(f"unknown cost coefficients {sorted(unknown)}; known: {names}")
            bad = [k for k, v in coefficients.items() if not math.isfinite(v) or v < 0]
            if bad:
                raise ValoraError(f"cost coefficients must be finite and >= 0: {bad}")
        if self.graph_max_rows < 0:
            raise ValoraError(f"graph_max_rows must be >= 0, got {self.graph_max_rows}")
        if not (self.eager_scale > 0 and self.graph_scale > 0
                and math.isfinite(self.eager_scale) and math.isfinite(self.graph_scale)):
            raise ValoraError("eager_scale and graph_scale must be finite and > 0")

    def step_time(self, step: StepSpec | StepShape) -> float:
        """Estimated seconds of one step."""
        shape = (step_shape(step, self.graph_max_rows, self.fused_correction)
                 if isinstance(step, StepSpec) else step)
        seconds = sum(self.step_coefficients.get(name, 0.0) * value
                      for name, value in zip(STEP_FEATURES, shape.features(), strict=True))
        return seconds * (self.eager_scale if shape.eager else self.graph_scale)

    def added_tokens_time(self, num_tokens: int, context_tokens: int, lora_rank: int) -> float:
        """Seconds that ``num_tokens`` more tokens of one row (context ``context_tokens`` after the
        step, LoRA work ``lora_rank`` per token) add to a step that already runs that row (a
        prefill's tokens: an eager step, so scaled by ``eager_scale``)."""
        c = self.step_coefficients
        return self.eager_scale * (c.get("num_tokens", 0.0) * num_tokens
                                   + c.get("attention_pairs", 0.0) * num_tokens * context_tokens
                                   + c.get("lora_token_rank", 0.0) * num_tokens * lora_rank)

    def prefill_time(self, num_tokens: int, context_tokens: int, lora_rank: int,
                     lora_launches: int) -> float:
        """Seconds a prefill of ``num_tokens`` (one row, ``lora_launches`` LoRA launches under the
        mode) adds: its tokens' work plus the overhead of the eager step it makes, charged in
        full — one prefill per eager step. Prefills batched into one step share that overhead
        (:meth:`eager_overhead`; ``LatencyEstimator`` charges it once per shared step)."""
        return (self.added_tokens_time(num_tokens, context_tokens, lora_rank)
                + self.eager_overhead(lora_launches))

    def eager_overhead(self, lora_launches: int, *, shared: bool = False) -> float:
        """Seconds an eager step costs beyond its tokens' work: the eager intercept plus the
        host cost of ``lora_launches`` LoRA launches per linear (the step's largest row count).
        ``shared``: for a prefill joining a step already charged — only its extra launches."""
        c = self.step_coefficients
        intercept = 0.0 if shared else c.get("eager", 0.0)
        return self.eager_scale * (intercept + c.get("eager_lora_launches", 0.0) * lora_launches)

    def switch_time(self, num_bytes: int) -> float:
        """Estimated seconds of one merge or unmerge touching ``num_bytes`` of weights."""
        if num_bytes <= 0:
            return 0.0
        return (self.switch_coefficients.get("const", 0.0)
                + self.switch_coefficients.get("bytes", 0.0) * num_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"step": dict(self.step_coefficients), "switch": dict(self.switch_coefficients),
                "fit": dict(self.fit_info), "graph_max_rows": self.graph_max_rows}

    @classmethod
    def from_dict(cls, device_name: str, data: Mapping[str, Any]) -> CostModel:
        graph_max_rows = data.get("graph_max_rows", 0)  # absent in files before the eager terms
        if not isinstance(graph_max_rows, int) or isinstance(graph_max_rows, bool):
            raise ValoraError(f"malformed cost model: graph_max_rows must be an integer, "
                              f"got {graph_max_rows!r}")
        return cls(device_name, _floats(data, "step"), _floats(data, "switch"),
                   _floats(data, "fit", required=False), graph_max_rows)

    def save(self, path: str | Path) -> None:
        """Write (or replace) this device's entry in the JSON file at ``path``."""
        path = Path(path)
        document: dict[str, Any] = (_read(path) if path.exists()
                                    else {"version": _FORMAT_VERSION, "devices": {}})
        document["devices"][self.device_name] = self.to_dict()
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, device_name: str) -> CostModel:
        """Read ``device_name``'s entry; raises ``ValoraError`` naming the devices present."""
        devices = _read(Path(path))["devices"]
        if device_name not in devices:
            raise ValoraError(f"no cost model for device {device_name!r} in {path}; "
                              f"profiled devices: {sorted(devices)}")
        return cls.from_dict(device_name, devices[device_name])


def fit_cost_model(
    device_name: str,
    step_samples: Sequence[tuple[StepShape, float]],
    switch_samples: Sequence[tuple[int, float]] = (),
    graph_max_rows: int = 0,
    features: Sequence[str] | None = None,
) -> CostModel:
    """Fit coefficients by non-negative least squares on relative error. ``graph_max_rows`` is
    recorded with them (the samples' ``eager`` flags must follow from it). ``features``: fit only
    these step features (the others are 0) — for samples that cannot separate them all.

    Needs at least as many step samples as features; switch samples are optional (no samples =
    switches cost nothing, which a policy then never hesitates over).
    """
    if len(step_samples) < len(STEP_FEATURES):
        raise ValoraError(f"need >= {len(STEP_FEATURES)} step samples, got {len(step_samples)}")
    used = list(STEP_FEATURES) if features is None else [f for f in STEP_FEATURES if f in features]
    unknown = set(features or ()) - set(STEP_FEATURES)
    if unknown or not used:
        raise ValoraError(f"features {sorted(unknown) or '(none)'} not among {STEP_FEATURES}")
    columns = [STEP_FEATURES.index(f) for f in used]
    x = np.array([shape.features() for shape, _ in step_samples], dtype=np.float64)
    y = np.array([seconds for _, seconds in step_samples], dtype=np.float64)
    fitted = dict(zip(used, _nonnegative_relative_lstsq(x[:, columns], y), strict=True))
    step = {name: fitted.get(name, 0.0) for name in STEP_FEATURES}
    info = {"num_step_samples": float(len(y)), "step_rel_rmse": _rel_rmse(x, y, step)}
    switch = dict.fromkeys(SWITCH_FEATURES, 0.0)
    if switch_samples:
        xs = np.array([[1.0, float(b)] for b, _ in switch_samples])
        ys = np.array([seconds for _, seconds in switch_samples], dtype=np.float64)
        switch = dict(zip(SWITCH_FEATURES, _nonnegative_relative_lstsq(xs, ys), strict=True))
        info["num_switch_samples"] = float(len(ys))
        info["switch_rel_rmse"] = _rel_rmse(xs, ys, switch)
    return CostModel(device_name, step, switch, info, graph_max_rows)


def _nonnegative_relative_lstsq(x: np.ndarray, y: np.ndarray) -> list[float]:
    """min ‖(x·c − y)/y‖ subject to c >= 0: active-set refits dropping negative coefficients."""
    if (y <= 0).any():
        raise ValoraError("measured times must be positive")
    weighted = x / y[:, None]
    target = np.ones_like(y)
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    active = list(range(x.shape[1]))
    coefficients = np.zeros(x.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(weighted[:, active] / scale[active], target, rcond=None)
        solution = solution / scale[active]
        if (solution >= 0).all():
            coefficients[active] = solution
            break
        active = [col for col, value in zip(active, solution, strict=True) if value > 0]
    return [float(c) for c in coefficients]


def _rel_rmse(x: np.ndarray, y: np.ndarray, coefficients: dict[str, float]) -> float:
    predicted = x @ np.array(list(coefficients.values()))
    return float(np.sqrt(np.mean(((predicted - y) / y) ** 2)))


def _floats(data: Mapping[str, Any], name: str, required: bool = True) -> dict[str, float]:
    section = data.get(name, None if required else {})
    if not isinstance(section, Mapping):
        raise ValoraError(f"malformed cost model: {name!r} must be an object, got {section!r}")
    try:
        return {str(key): float(value) for key, value in section.items()}
    except (TypeError, ValueError) as exc:
        raise ValoraError(f"malformed cost model: {name!r}: {exc}") from exc


def _read(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValoraError(f"cannot read cost model file {path}: {exc}") from exc
    if (not isinstance(document, dict) or document.get("version") != _FORMAT_VERSION
            or not isinstance(document.get("devices"), dict)):
        raise ValoraError(f"{path}: not a valora cost model file (version {_FORMAT_VERSION})")
    return document
