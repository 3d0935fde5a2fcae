"""The task-head interface the engine and the trainer share.

A head is a small ``torch.nn.Module`` that reads the trailing prompt hidden states of one forward
pass and produces a bounded answer, so a request finishes after its prefill with no decoding.

Semantics::

    outputs = head(hidden)              # hidden: [batch, num_input_tokens, hidden_size]
    loss    = head.loss(outputs, targets)
    result  = head.decode(outputs, i)   # HeadResult of batch row i
    result  = head.run(hidden_1)        # hidden_1: [n >= num_input_tokens, hidden_size]
                                        # (eval mode, no grad)

Heads compute in float32 whatever dtype the model runs in; ``run`` casts its input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from valora.errors import InvalidRequestError
from valora.heads.result import HeadResult
from valora.heads.spec import HeadSpec

HeadOutputs = dict[str, torch.Tensor]
"""Named output tensors of a forward pass, each with the batch as its first dimension."""


class TaskHead(nn.Module, ABC):
    """Base class of every head kind. Subclasses set ``kind`` and implement ``check_spec``,
    ``forward``, ``loss`` and ``decode``; construction validates the spec."""

    kind: ClassVar[str]

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        type(self).check_spec(spec)
        self.spec = spec

    @classmethod
    @abstractmethod
    def check_spec(cls, spec: HeadSpec) -> None:
        """Raise ``InvalidAdapterError`` when ``spec`` cannot describe a head of this kind."""

    @property
    def num_input_tokens(self) -> int:
        """How many trailing prompt hidden states ``run`` needs."""
        return self.spec.num_input_tokens

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def task(self) -> str:
        return self.spec.task

    @abstractmethod
    def forward(self, hidden: torch.Tensor) -> HeadOutputs:
        """``hidden: [batch, num_input_tokens, hidden_size]`` float32 → output tensors."""

    @abstractmethod
    def loss(self, outputs: HeadOutputs, targets: Sequence[Any]) -> torch.Tensor:
        """Scalar training loss of ``outputs`` against one target per batch row."""

    @abstractmethod
    def decode(self, outputs: HeadOutputs, index: int) -> HeadResult:
        """The answer of batch row ``index``."""

    def run(self, hidden: torch.Tensor) -> HeadResult:
        """Answer one request from its trailing prompt hidden states ``[n, hidden_size]``.

        Uses the last ``num_input_tokens`` rows; fewer rows, or a wrong width, is an
        ``InvalidRequestError`` (the prompt was shorter than the head's input window).
        """
        if hidden.dim() != 2 or hidden.shape[1] != self.spec.hidden_size:
            raise InvalidRequestError(
                f"task head {self.task!r} expects hidden states [n, {self.spec.hidden_size}], "
                f"got {list(hidden.shape)}")
        need = self.num_input_tokens
        if hidden.shape[0] < need:
            raise InvalidRequestError(
                f"task head {self.task!r} reads the last {need} prompt tokens but the prompt has "
                f"{hidden.shape[0]}")
        param = next(self.parameters())
        window = hidden[-need:].to(device=param.device, dtype=param.dtype).unsqueeze(0)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.decode(self(window), 0)
        finally:
            self.train(was_training)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[batch, n, hidden] → [batch, hidden]`` by the spec's pooling (``last`` or ``mean``)."""
        if self.spec.pooling == "mean":
            return hidden.mean(dim=1)
        return hidden[:, -1]
