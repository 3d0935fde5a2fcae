"""What a simulation reports: per-request timestamps, the mode timeline and summary metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from valora.orchestrator.modes import Mode


@dataclass
class RequestRecord:
    """Simulated timestamps of one request (seconds); ``max_wait_s`` is its longest stretch
    without progress (arrival to first step, or between steps that ran it)."""

    request_id: str
    adapter: str | None
    arrival_time: float
    latency_target_s: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    max_wait_s: float = 0.0

    @property
    def latency_s(self) -> float:
        if self.finished_time is None:
            raise ValueError(f"{self.request_id} did not finish")
        return self.finished_time - self.arrival_time

    @property
    def ttft_s(self) -> float:
        if self.first_token_time is None:
            raise ValueError(f"{self.request_id} produced no token")
        return self.first_token_time - self.arrival_time


@dataclass
class SimResult:
    """Outcome of ``simulate``: records in arrival order, mode changes ``(time, mode, adapter)``,
    weight switches and their total time."""

    records: list[RequestRecord] = field(default_factory=list)
    timeline: list[tuple[float, Mode, str | None]] = field(default_factory=list)
    num_switches: int = 0
    switch_time_s: float = 0.0
    num_steps: int = 0
    end_time: float = 0.0

    def record_mode(self, now: float, mode: Mode, adapter: str | None) -> None:
        if not self.timeline or self.timeline[-1][1:] != (mode, adapter):
            self.timeline.append((now, mode, adapter))

    @property
    def all_finished(self) -> bool:
        return all(r.finished_time is not None for r in self.records)

    def summary(self) -> dict[str, float]:
        """Mean / P50 / P90 / P99 latency, mean TTFT, max wait, target attainment, throughput."""
        latency = np.array([r.latency_s for r in self.records])
        ttft = np.array([r.ttft_s for r in self.records])
        targeted = [r for r in self.records if r.latency_target_s is not None]
        met = sum(r.latency_s <= (r.latency_target_s or 0.0) for r in targeted)
        span = self.end_time - min((r.arrival_time for r in self.records), default=0.0)
        return {
            "num_requests": float(len(self.records)),
            "mean_latency_s": float(latency.mean()) if latency.size else 0.0,
            "p50_latency_s": float(np.percentile(latency, 50)) if latency.size else 0.0,
            "p90_latency_s": float(np.percentile(latency, 90)) if latency.size else 0.0,
            "p99_latency_s": float(np.percentile(latency, 99)) if latency.size else 0.0,
            "mean_ttft_s": float(ttft.mean()) if ttft.size else 0.0,
            "max_wait_s": max((r.max_wait_s for r in self.records), default=0.0),
            "target_attainment": met / len(targeted) if targeted else 1.0,
            "throughput_rps": len(self.records) / span if span > 0 else 0.0,
            "num_switches": float(self.num_switches),
            "switch_time_s": self.switch_time_s,
            "num_steps": float(self.num_steps),
        }
