"""A request's life inside the engine: identity, tokens, progress and status (no tensors).

State machine::

    WAITING ──schedule──▶ RUNNING ──finish──▶ FINISHED_{STOPPED,LENGTH,ABORTED,ERROR}
       ▲                     │
       └────── PREEMPTED ◀───┘  (pages freed; recomputed from scratch when rescheduled)

Invariant: ``0 <= num_computed_tokens <= num_tokens``; tokens ``[0, num_computed_tokens)`` have
their K/V in the request's pages. Image placeholder tokens are already expanded in
``prompt_token_ids`` (one id per image feature row).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from valora.sampling_params import SamplingParams

PENDING_TOKEN = -1
"""Stands in ``Request.output_token_ids`` for a token the step in flight is still sampling
(``SchedulerConfig.async_scheduling``): it counts as a token — the next step is scheduled and laid
out with it — and is replaced by the sampled id before anything reads its value on the host. At
most one, always the last."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class ImageSpan:
    """One image inside a prompt: its placeholder tokens ``[offset, offset + length)``.

    ``pixel_values`` is the preprocessed tensor (``[3, H, W]``), kept until the image's
    embeddings are computed; ``digest`` identifies the image bytes (prefix-cache keys use it).
    """

    offset: int
    length: int
    digest: str
    pixel_values: Any = None


@dataclass(eq=False)
class Request:
    """One generation (or task-head) request as the engine tracks it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    adapter_name: str | None = None
    adapter_digest: str | None = None
    task: str | None = None
    # Trailing tokens always computed even on a prefix-cache hit: 1 (the logits), or a task
    # head's whole input window (it reads their hidden states).
    num_recompute_tail: int = 1
    images: list[ImageSpan] = field(default_factory=list)
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    latency_target_s: float | None = None
    eos_token_ids: tuple[int, ...] = ()

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    logprob_outputs: list[Any] = field(default_factory=list)
    """``TokenLogprob`` of ``output_logprobs[:len(logprob_outputs)]``, built once each
    (``valora.engine.outputs_builder``; both lists only grow)."""
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building ``all_token_ids`` (a decode step's one
        token costs O(1), not O(prompt + output))."""
        prompt = self.prompt_token_ids
        split = len(prompt)
        if start >= split:
            return self.output_token_ids[start - split:end - split]
        if end <= split:
            return prompt[start:end]
        return prompt[start:] + self.output_token_ids[:end - split]

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefill_done(self) -> bool:
        """True once every prompt token has K/V computed (the next step samples)."""
        return self.num_computed_tokens >= self.num_prompt_tokens

    def finish(self, status: RequestStatus, error: str | None = None) -> None:
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        self.status = status
        self.error = error
        self.finished_time = time.monotonic()
