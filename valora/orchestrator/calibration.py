"""Online calibration of a profiled cost model against the steps the engine actually runs.

``valora profile-modes`` times the model's forward alone, on a quiet engine. A serving step also
builds its batch, runs the vision tower on new images, samples and reads tokens back, on a host
that other work shares; on an H200 the serving runs' eager steps took up to ≈ 2.4× what the
profile predicts while graph-replayed decode steps matched it (``docs/modes.md`` §3). A policy
that plans with the profile alone under-prices eager steps — the very steps merged mode makes
cheaper.

:class:`StepCalibration` keeps, per path (eager or graph-replayed), a smoothed ratio of measured
to predicted step time, in log space (ratios multiply; one 10× outlier does not dominate), with
bias correction so the first few observations count fully. :meth:`StepCalibration.apply` scales
the model's step predictions by it (``CostModel.eager_scale`` / ``graph_scale``); switch costs
are timed separately and stay as profiled. Scales are clamped to ``[1/max_scale, max_scale]``
and stay 1 until ``min_samples`` steps of that path were seen.

Invariants: a calibrated model differs from its profile only in the two scales; observing is
O(1); the scales depend only on the ratios observed, never on the policy's decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from valora.errors import InvalidRequestError
from valora.orchestrator.cost_model import CostModel


@dataclass
class _PathRatio:
    """Bias-corrected exponential moving average of ``log(measured / predicted)``."""

    mean: float = 0.0
    weight: float = 0.0
    count: int = 0

    def add(self, log_ratio: float, smoothing: float) -> None:
        self.mean = (1.0 - smoothing) * self.mean + smoothing * log_ratio
        self.weight = (1.0 - smoothing) * self.weight + smoothing
        self.count += 1

    def scale(self, min_samples: int, max_scale: float) -> float:
        if self.count < min_samples or self.weight <= 0.0:
            return 1.0
        bound = math.log(max_scale)
        return math.exp(min(bound, max(-bound, self.mean / self.weight)))


@dataclass
class StepCalibration:
    """Measured-over-predicted step time per path (module docstring).

    ``smoothing``: weight of the newest observation (0.05 ≈ the last ~20 steps dominate).
    ``min_samples``: observations of a path before its scale leaves 1. ``max_scale``: bound of
    the scale in either direction. ``version`` counts the observations (callers cache the
    calibrated model per version)."""

    smoothing: float = 0.05
    min_samples: int = 8
    max_scale: float = 4.0
    version: int = 0
    _eager: _PathRatio = field(default_factory=_PathRatio)
    _graph: _PathRatio = field(default_factory=_PathRatio)

    def __post_init__(self) -> None:
        if not 0.0 < self.smoothing <= 1.0 or self.min_samples < 1 or self.max_scale < 1.0:
            raise InvalidRequestError("step calibration: 0 < smoothing <= 1, min_samples >= 1 "
                                      "and max_scale >= 1 required")

    def observe(self, predicted_s: float, measured_s: float, eager: bool) -> None:
        """Record one step: the model's prediction and the measured seconds (non-positive or
        non-finite values are ignored: a step that sampled nothing has no time of its own)."""
        if not (predicted_s > 0.0 and measured_s > 0.0 and math.isfinite(predicted_s)
                and math.isfinite(measured_s)):
            return
        path = self._eager if eager else self._graph
        path.add(math.log(measured_s / predicted_s), self.smoothing)
        self.version += 1

    @property
    def eager_scale(self) -> float:
        return self._eager.scale(self.min_samples, self.max_scale)

    @property
    def graph_scale(self) -> float:
        return self._graph.scale(self.min_samples, self.max_scale)

    @property
    def num_observations(self) -> tuple[int, int]:
        """(eager, graph-replayed) steps observed."""
        return self._eager.count, self._graph.count

    def apply(self, model: CostModel) -> CostModel:
        """``model`` with its step predictions scaled by the current ratios."""
        return replace(model, eager_scale=self.eager_scale, graph_scale=self.graph_scale)


__all__ = ["StepCalibration"]
