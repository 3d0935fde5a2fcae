"""Prometheus metrics, kept by hand (no client library) and rendered in the text exposition format.

Counters and histograms are updated on the event-loop thread only (handlers and middleware), so
they need no lock. Gauges (queue length, KV pages, adapter residency) are read from the engine at
scrape time. Every top-level number in ``AsyncEngine.stats()`` is also exported as
``valora_engine_<key>``, and every string as ``valora_engine_<key>_info{value=...} 1``, so
counters the engine gains later (mode, mode switches) appear without changes here.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from valora.engine.async_engine import EngineHealth
from valora.outputs import RequestOutput

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RESIDENCIES = ("device", "cpu", "none")
BASE_LABEL = "__base__"


class Histogram:
    """Cumulative-bucket histogram in Prometheus' convention (``le`` upper bounds, ``+Inf``
    last)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if math.isinf(bound) else repr(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        lines += [f"{name}_sum {self.total!r}", f"{name}_count {running}"]
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    """What the server counts; ``render`` produces the ``/metrics`` body."""

    def __init__(self) -> None:
        self.http_responses: Counter[tuple[str, str]] = Counter()
        self.finished: Counter[tuple[str, str]] = Counter()
        self.adapter_requests: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.ttft = Histogram(LATENCY_BUCKETS_S)

    def observe_http(self, route: str, status: int) -> None:
        self.http_responses[(route, str(status))] += 1

    def observe_started(self, adapter: str | None) -> None:
        self.adapter_requests[adapter or BASE_LABEL] += 1

    def observe_finished(self, output: RequestOutput | None, reason: str,
                         adapter: str | None) -> None:
        """Count a request that ended (``reason``: stop, length, abort or error); ``output`` is
        its last output, if any arrived."""
        self.finished[(reason, adapter or BASE_LABEL)] += 1
        if output is None:
            return
        self.prompt_tokens += len(output.prompt_token_ids)
        if output.outputs:
            self.generation_tokens += len(output.outputs[0].token_ids)
        if reason in ("stop", "length"):
            if output.metrics.latency_s is not None:
                self.latency.observe(output.metrics.latency_s)
            if output.metrics.time_to_first_token_s is not None:
                self.ttft.observe(output.metrics.time_to_first_token_s)

    def render(self, stats: Mapping[str, Any], health: EngineHealth, adapters: list[Any]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        family("valora_http_responses_total", "counter", "HTTP responses by route and status code",
               (f"valora_http_responses_total{_labels(route=r, code=c)} {n}"
                for (r, c), n in sorted(self.http_responses.items())))
        family("valora_requests_finished_total", "counter",
               "Generation requests by finish reason and adapter",
               (f"valora_requests_finished_total{_labels(finish_reason=f, adapter=a)} {n}"
                for (f, a), n in sorted(self.finished.items())))
        family("valora_adapter_requests_total", "counter",
               "Generation requests admitted, by adapter",
               (f"valora_adapter_requests_total{_labels(adapter=a)} {n}"
                for a, n in sorted(self.adapter_requests.items())))
        family("valora_prompt_tokens_total", "counter",
               "Prompt tokens of finished requests (image tokens included)",
               [f"valora_prompt_tokens_total {self.prompt_tokens}"])
        family("valora_generation_tokens_total", "counter", "Generated tokens of finished requests",
               [f"valora_generation_tokens_total {self.generation_tokens}"])
        family("valora_request_latency_seconds", "histogram",
               "End-to-end latency of completed requests",
               self.latency.render("valora_request_latency_seconds"))
        family("valora_time_to_first_token_seconds", "histogram",
               "Time to first token of completed requests",
               self.ttft.render("valora_time_to_first_token_seconds"))
        family("valora_engine_healthy", "gauge", "1 while the engine serves, 0 once it is dead",
               [f"valora_engine_healthy {int(health.healthy)}"])
        family("valora_requests_in_flight", "gauge",
               "Requests the server is streaming or waiting on",
               [f"valora_requests_in_flight {health.num_in_flight}"])
        if "kv_pages_total" in stats and "kv_pages_free" in stats:
            family("valora_kv_pages_in_use", "gauge", "KV cache pages held by requests",
                   [f"valora_kv_pages_in_use {stats['kv_pages_total'] - stats['kv_pages_free']}"])
        family("valora_adapter_residency", "gauge",
               "1 for the adapter's current residency (device slot, host cache, or disk only)",
               (f"valora_adapter_residency{_labels(adapter=a.name, residency=r)} "
                f"{int(a.residency == r)}"
                for a in adapters for r in RESIDENCIES))
        family("valora_adapter_pins", "gauge", "Requests currently pinning the adapter in its slot",
               (f"valora_adapter_pins{_labels(adapter=a.name)} {a.pin_count}" for a in adapters))
        out.extend(_engine_samples(stats))
        return "\n".join(out) + "\n"


def _engine_samples(stats: Mapping[str, Any], prefix: str = "valora_engine_") -> list[str]:
    """Export numbers as gauges and strings as info series; nested dataclasses/dicts recurse."""
    lines: list[str] = []
    for key, value in sorted(stats.items()):
        name = prefix + "".join(ch if ch.isalnum() else "_" for ch in str(key))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            lines.extend(_engine_samples(value, name + "_"))
        elif isinstance(value, bool | int | float):
            lines.extend([f"# TYPE {name} gauge", f"{name} {float(value)!r}"])
        elif isinstance(value, str):
            lines.extend([f"# TYPE {name}_info gauge", f"{name}_info{_labels(value=value)} 1"])
    return lines
