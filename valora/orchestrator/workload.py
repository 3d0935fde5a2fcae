"""Synthetic serving workloads: arrival processes and adapter popularity (for the simulator and
the serving benchmark).

Arrivals: ``poisson`` (exponential gaps) or ``gamma`` (gaps with coefficient of variation ``cv``,
bursty for ``cv > 1``), at ``rate_per_s`` on average. Popularity over ``adapters`` (in the given
order): ``uniform``, ``zipf`` (weight of the i-th adapter ∝ ``1 / (i+1)^zipf_alpha``) or
``one-hot`` (the first adapter gets ``hot_fraction`` of requests, the rest share the remainder
uniformly). ``base_fraction`` of requests use no adapter. Lengths are uniform in the inclusive
ranges given. Deterministic for a given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from valora.errors import InvalidRequestError


@dataclass(frozen=True)
class SimRequest:
    """One request of a workload: what arrives when, for which adapter, how long it runs."""

    request_id: str
    adapter: str | None
    arrival_time: float
    prompt_tokens: int
    output_tokens: int
    latency_target_s: float | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    """Knobs of :func:`generate_workload` (see module docstring)."""

    num_requests: int
    rate_per_s: float
    adapters: tuple[str, ...]
    popularity: Literal["uniform", "zipf", "one-hot"] = "zipf"
    zipf_alpha: float = 1.0
    hot_fraction: float = 0.7
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = 1.0
    prompt_tokens: tuple[int, int] = (600, 700)
    output_tokens: tuple[int, int] = (8, 64)
    base_fraction: float = 0.0
    latency_target_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 0 or self.rate_per_s <= 0 or not self.adapters:
            raise InvalidRequestError("workload needs num_requests >= 0, rate > 0, >= 1 adapter")
        for low, high in (self.prompt_tokens, self.output_tokens):
            if not 1 <= low <= high:
                raise InvalidRequestError(f"bad length range ({low}, {high})")
        if not 0.0 <= self.base_fraction <= 1.0 or not 0.0 < self.hot_fraction <= 1.0:
            raise InvalidRequestError("base_fraction in [0, 1] and hot_fraction in (0, 1] required")
        if self.cv <= 0:
            raise InvalidRequestError("cv must be positive")


def popularity_weights(spec: WorkloadSpec) -> np.ndarray:
    """Probability of each adapter in ``spec.adapters`` (sums to 1)."""
    count = len(spec.adapters)
    weights: np.ndarray
    if spec.popularity == "uniform":
        weights = np.ones(count)
    elif spec.popularity == "zipf":
        weights = 1.0 / np.arange(1, count + 1) ** spec.zipf_alpha
    elif spec.popularity == "one-hot":
        rest = (1.0 - spec.hot_fraction) / max(1, count - 1)
        weights = np.array([spec.hot_fraction] + [rest] * (count - 1))
    else:
        raise InvalidRequestError(f"unknown popularity {spec.popularity!r}")
    return np.asarray(weights / weights.sum(), dtype=np.float64)


def arrival_gaps(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    mean = 1.0 / spec.rate_per_s
    if spec.arrival == "poisson":
        return np.asarray(rng.exponential(mean, spec.num_requests), dtype=np.float64)
    if spec.arrival == "gamma":
        shape = 1.0 / spec.cv**2
        return np.asarray(rng.gamma(shape, mean / shape, spec.num_requests), dtype=np.float64)
    raise InvalidRequestError(f"unknown arrival process {spec.arrival!r}")


def generate_workload(spec: WorkloadSpec) -> list[SimRequest]:
    """Requests in arrival order, ids ``r0, r1, ...``."""
    rng = np.random.default_rng(spec.seed)
    arrivals = np.cumsum(arrival_gaps(spec, rng))
    picks = rng.choice(len(spec.adapters), size=spec.num_requests, p=popularity_weights(spec))
    base = rng.random(spec.num_requests) < spec.base_fraction
    prompts = rng.integers(spec.prompt_tokens[0], spec.prompt_tokens[1] + 1, spec.num_requests)
    outputs = rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1, spec.num_requests)
    return [SimRequest(f"r{i}", None if base[i] else spec.adapters[int(picks[i])],
                       float(arrivals[i]), int(prompts[i]), int(outputs[i]), spec.latency_target_s)
            for i in range(spec.num_requests)]


def adapter_names(count: int, prefix: str = "adapter") -> tuple[str, ...]:
    return tuple(f"{prefix}-{i}" for i in range(count))


def mixed_ranks(names: Sequence[str], ranks: Sequence[int] = (8, 16, 32, 64)) -> dict[str, int]:
    """Assign ranks round-robin (a deterministic mix of ranks)."""
    return {name: ranks[i % len(ranks)] for i, name in enumerate(names)}
