"""Per-device cost model: iteration time per mode and batch shape, and mode-switch time.

A step is described by :class:`StepSpec` (its rows, the mode and the merged adapter); its cost
features (:class:`StepShape`) follow from the mode's LoRA work (``plan_lora_batches`` semantics):
rows of the merged adapter pay no LoRA; other adapter rows pay their own rank and, in mixed mode,
the merged adapter's rank again for the correction launch; base rows pay only the correction. ::

    t_step   = c_const + c_tokens·num_tokens + c_rows·num_rows + c_context·context_tokens
             + c_attention·attention_pairs
             + c_lora·Σ_segments tokens·rank + c_segment_rank·Σ_segments rank
             + c_segment·num_segments + c_launch·num_launches
    t_switch = s_const + s_byte·bytes      (one merge or one unmerge of that many weight bytes)

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
                 "lora_token_rank", "lora_segment_rank", "lora_segments", "lora_launches")
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

    def features(self) -> list[float]:
        return [1.0, self.num_tokens, self.num_rows, self.context_tokens, self.attention_pairs,
                self.lora_token_rank, self.lora_segment_rank, self.lora_segments,
                self.lora_launches]


def lora_rank_per_token(adapter: str | None, rank: int, mode: Mode, merged_adapter: str | None,
                        merged_rank: int) -> int:
    """LoRA work per token of a row under ``mode``: 0 for the merged adapter's rows, its own rank
    plus the merged adapter's (correction) for other rows while merged, its own rank unmerged."""
    if not mode.has_merged_adapter:
        return rank if adapter is not None else 0
    if adapter == merged_adapter:
        return 0
    return (rank if adapter is not None else 0) + merged_rank


def step_shape(spec: StepSpec) -> StepShape:
    """Features of ``spec`` under its mode (merged rows free, corrections charged)."""
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
    return StepShape(
        num_tokens=sum(r.num_tokens for r in spec.rows),
        num_rows=len(spec.rows),
        context_tokens=sum(r.context_tokens for r in spec.rows),
        attention_pairs=sum(r.num_tokens * r.context_tokens for r in spec.rows),
        lora_token_rank=work + corrected * spec.merged_rank,
        lora_segment_rank=sum(own.values()) + correction * spec.merged_rank,
        lora_segments=len(own) + correction,
        lora_launches=int(bool(own)) + correction,
    )


@dataclass(frozen=True)
class CostModel:
    """Fitted step and switch costs for one device (all coefficients in seconds per unit)."""

    device_name: str
    step_coefficients: dict[str, float]
    switch_coefficients: dict[str, float]
    fit_info: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for names, coefficients in ((STEP_FEATURES, self.step_coefficients),
                                    (SWITCH_FEATURES, self.switch_coefficients)):
            unknown = set(coefficients) - set(names)
            if unknown:
                raise ValoraError(f"unknown cost coefficients {sorted(unknown)}; known: {names}")
            bad = [k for k, v in coefficients.items() if not math.isfinite(v) or v < 0]
            if bad:
                raise ValoraError(f"cost coefficients must be finite and >= 0: {bad}")

    def step_time(self, step: StepSpec | StepShape) -> float:
        """Estimated seconds of one step."""
        shape = step_shape(step) if isinstance(step, StepSpec) else step
        return sum(self.step_coefficients.get(name, 0.0) * value
                   for name, value in zip(STEP_FEATURES, shape.features(), strict=True))

    def added_tokens_time(self, num_tokens: int, context_tokens: int, lora_rank: int) -> float:
        """Seconds that ``num_tokens`` more tokens of one row (context ``context_tokens`` after the
        step, LoRA work ``lora_rank`` per token) add to a step that already runs that row."""
        c = self.step_coefficients
        return (c.get("num_tokens", 0.0) * num_tokens
                + c.get("attention_pairs", 0.0) * num_tokens * context_tokens
                + c.get("lora_token_rank", 0.0) * num_tokens * lora_rank)

    def switch_time(self, num_bytes: int) -> float:
        """Estimated seconds of one merge or unmerge touching ``num_bytes`` of weights."""
        if num_bytes <= 0:
            return 0.0
        return (self.switch_coefficients.get("const", 0.0)
                + self.switch_coefficients.get("bytes", 0.0) * num_bytes)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"step": dict(self.step_coefficients), "switch": dict(self.switch_coefficients),
                "fit": dict(self.fit_info)}

    @classmethod
    def from_dict(cls, device_name: str, data: Mapping[str, Any]) -> CostModel:
        return cls(device_name, _floats(data, "step"), _floats(data, "switch"),
                   _floats(data, "fit", required=False))

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
) -> CostModel:
    """Fit coefficients by non-negative least squares on relative error.

    Needs at least as many step samples as features; switch samples are optional (no samples =
    switches cost nothing, which a policy then never hesitates over).
    """
    if len(step_samples) < len(STEP_FEATURES):
        raise ValoraError(f"need >= {len(STEP_FEATURES)} step samples, got {len(step_samples)}")
    x = np.array([shape.features() for shape, _ in step_samples], dtype=np.float64)
    y = np.array([seconds for _, seconds in step_samples], dtype=np.float64)
    step = dict(zip(STEP_FEATURES, _nonnegative_relative_lstsq(x, y), strict=True))
    info = {"num_step_samples": float(len(y)), "step_rel_rmse": _rel_rmse(x, y, step)}
    switch = dict.fromkeys(SWITCH_FEATURES, 0.0)
    if switch_samples:
        xs = np.array([[1.0, float(b)] for b, _ in switch_samples])
        ys = np.array([seconds for _, seconds in switch_samples], dtype=np.float64)
        switch = dict(zip(SWITCH_FEATURES, _nonnegative_relative_lstsq(xs, ys), strict=True))
        info["num_switch_samples"] = float(len(ys))
        info["switch_rel_rmse"] = _rel_rmse(xs, ys, switch)
    return CostModel(device_name, step, switch, info)


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
