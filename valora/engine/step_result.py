"""What a model step hands back: its result, the launched-but-unread step of ``ModelRunner.launch``,
and the per-token LoRA plan the runner asks the engine for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from valora.engine.sampler import SampledTokens
from valora.outputs import TokenLogprob
from valora.request import Request


@dataclass
class StepResult:
    """What a step produced: a token (and maybe logprobs) for each request that sampled, and the
    trailing prompt hidden states of task-head requests whose prefill completed."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    head_hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    """Host wall time of the step (as ``StepRecord.seconds``: GPU time included when it sampled)."""
    graphed: bool = False
    """Whether a CUDA graph replay ran the forward."""


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are launched and whose tokens are not read yet
    (``ModelRunner.launch``; ``ModelRunner.finish`` reads them)."""

    started: float
    graphed: bool
    num_rows: int
    num_tokens: int
    lora_ops: int
    mode: str
    result: StepResult = field(default_factory=StepResult)
    sampling: list[Request] = field(default_factory=list)
    """The requests that sample, in the sampled tokens' row order."""
    sampled: SampledTokens | None = None

    def token_rows(self) -> dict[str, int]:
        """Request id → its row in ``sampled.chosen``."""
        return {request.request_id: i for i, request in enumerate(self.sampling)}


@dataclass
class LoRAStepPlan:
    """Per-token LoRA slots for this step (see ``valora.orchestrator.modes``)."""

    token_slots: list[int]
    correction_slots: list[int] | None = None
