"""What callers get back from the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (``time.monotonic``) and derived latencies, in seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency_s(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def queue_time_s(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of the sampled token plus the top alternatives (token id → logprob). Read-only:
    the engine builds each token's record once and every later snapshot shares it."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """The generated continuation of one request.

    ``text`` is the full decoded output so far (stop strings removed); ``delta_text`` the part
    added since the previous output of a streaming request. ``finish_reason`` is ``None`` while
    running, else ``"stop"``, ``"length"``, ``"abort"`` or ``"error"``. ``head_result`` is set for
    task-head adapters (label as ``text``; scores/boxes here).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    delta_text: str = ""
    logprobs: list[TokenLogprob] | None = None
    head_result: dict[str, Any] | None = None


@dataclass
class RequestOutput:
    """One request's state as reported after an engine step (or at the end, for ``LLM.generate``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    adapter_name: str | None
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""
