"""Per-request timings of a benchmark run and their summary.

Times are seconds from the run's start on one monotonic clock. A request's latency runs from its
*scheduled* arrival (open loop: a late submission counts against the server), TTFT to its first
output token, TPOT is ``(finish − first token) / (output tokens − 1)`` over requests with at least
two tokens. Latency percentiles, target attainment and throughput reuse the simulator's summary
(:meth:`valora.orchestrator.sim_metrics.SimResult.summary`) on the finished requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from valora.orchestrator.sim_metrics import RequestRecord, SimResult


@dataclass
class RequestTiming:
    """What one request experienced. ``error`` is set when it failed or was refused."""

    request_id: str
    adapter: str | None
    kind: str
    arrival_s: float
    latency_target_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None and self.first_token_s is not None


def _percentiles(values: Sequence[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"mean_{prefix}": None, f"p50_{prefix}": None, f"p90_{prefix}": None,
                f"p99_{prefix}": None}
    data = np.asarray(values, dtype=np.float64)
    return {f"mean_{prefix}": float(data.mean()),
            f"p50_{prefix}": float(np.percentile(data, 50)),
            f"p90_{prefix}": float(np.percentile(data, 90)),
            f"p99_{prefix}": float(np.percentile(data, 99))}


def summarize(timings: Sequence[RequestTiming]) -> dict[str, float | None]:
    """Latency / TTFT / TPOT mean and P50/P90/P99, target attainment (``None`` when no request
    had a target), throughput in requests/s and output tokens/s over the span from the first
    arrival to the last finish, and the number of failed requests."""
    done = [t for t in timings if t.ok]
    records = [RequestRecord(t.request_id, t.adapter, t.arrival_s, t.latency_target_s,
                             first_token_time=t.first_token_s, finished_time=t.finish_s)
               for t in done]
    end = max((t.finish_s for t in done if t.finish_s is not None), default=0.0)
    base = SimResult(records=records, end_time=end).summary() if records else {}
    tpot = [(t.finish_s - t.first_token_s) / (t.num_output_tokens - 1)
            for t in done if t.num_output_tokens > 1
            and t.finish_s is not None and t.first_token_s is not None]
    ttft = [t.first_token_s - t.arrival_s for t in done if t.first_token_s is not None]
    latency = [t.finish_s - t.arrival_s for t in done if t.finish_s is not None]
    targeted = [t for t in done if t.latency_target_s is not None]
    span = end - min((t.arrival_s for t in done), default=0.0)
    summary: dict[str, float | None] = {
        "num_requests": float(len(timings)),
        "num_finished": float(len(done)),
        "num_failed": float(len(timings) - len(done)),
        **_percentiles(latency, "latency_s"),
        **_percentiles(ttft, "ttft_s"),
        **_percentiles(tpot, "tpot_s"),
        "target_attainment": base.get("target_attainment") if targeted else None,
        "throughput_rps": base.get("throughput_rps", 0.0),
        "output_tokens_per_s": (sum(t.num_output_tokens for t in done) / span
                                if span > 0 else 0.0),
    }
    return summary
