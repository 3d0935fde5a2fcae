"""What the scheduler decided for one step: which requests run, how many new tokens each.

The model runner turns a ``SchedulerOutput`` into a ``ForwardBatch``: scheduled request ``i``
contributes tokens ``all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]``
at those positions, and its K/V goes to the page table the KV cache manager holds for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valora.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    ``num_computed_tokens`` and ``num_tokens`` are snapshots taken when the step was scheduled
    (the request object moves on: ``advance`` bumps its computed count, the engine appends the
    sampled token), so the properties below stay valid for the whole step.

    ``is_prefill`` is true while the request is (re)building its cache: the step holds prompt
    tokens, or recomputes outputs after a preemption. A pure decode (one new token after a fully
    computed context) is not a prefill.
    """

    request: Request
    num_new_tokens: int
    is_prefill: bool
    num_computed_tokens: int = field(init=False)
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        if self.num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {self.num_new_tokens}")
        self.num_computed_tokens = self.request.num_computed_tokens
        self.num_tokens = self.request.num_tokens
        if self.num_computed_tokens + self.num_new_tokens > self.num_tokens:
            raise ValueError(
                f"request {self.request.request_id!r}: {self.num_computed_tokens} computed + "
                f"{self.num_new_tokens} new tokens exceeds its {self.num_tokens} tokens"
            )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def seq_len(self) -> int:
        """Context length after the step (cached + new tokens)."""
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether the step produces logits for a new token: it reaches the last known token."""
        return self.seq_len == self.num_tokens


def samples_token(scheduled: ScheduledRequest) -> bool:
    """Whether ``scheduled`` samples a token this step (see ``ScheduledRequest.samples``)."""
    return scheduled.samples


def is_prefill_step(request: Request) -> bool:
    """Whether scheduling ``request`` now (re)builds its cache rather than decoding one token."""
    return request.num_computed_tokens < max(request.num_prompt_tokens, request.num_tokens - 1)


@dataclass
class SchedulerOutput:
    """The plan of one step.

    ``scheduled``: requests running this step, in batch order (continuing requests first, then
    newly admitted ones). ``preempted``: requests evicted this step (pages freed; they will be
    recomputed). ``num_batched_tokens``: sum of ``num_new_tokens``, at most the token budget.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def sampling(self) -> list[ScheduledRequest]:
        """Scheduled requests that sample a token this step, in batch order."""
        return [item for item in self.scheduled if item.samples]

    @property
    def request_ids(self) -> list[str]:
        return [item.request_id for item in self.scheduled]
