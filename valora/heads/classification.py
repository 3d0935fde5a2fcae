"""Classification head: an MLP on the pooled trailing prompt hidden state.

Semantics::

    x      = pool(hidden)                        # [batch, hidden_size]   (last token or mean)
    logits = W2 · gelu(W1 · layer_norm(x) + b1) + b2   # [batch, num_labels]
    scores = softmax(logits);  label = labels[argmax(scores)]

``params``: ``mlp_hidden`` (width of the hidden layer, default 256), ``label_smoothing``
(training only, default 0.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from valora.errors import InvalidAdapterError
from valora.heads.base import HeadOutputs, TaskHead
from valora.heads.result import HeadResult
from valora.heads.spec import HeadSpec


class ClassificationHead(TaskHead):
    """One label out of ``spec.labels`` with a probability for each."""

    kind = "classification"

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__(spec)
        width = spec.param_int("mlp_hidden", 256)
        self.norm = nn.LayerNorm(spec.hidden_size)
        self.fc1 = nn.Linear(spec.hidden_size, width)
        self.fc2 = nn.Linear(width, len(spec.labels))
        self.label_smoothing = spec.param_float("label_smoothing", 0.0, 0.0, 0.5)

    @classmethod
    def check_spec(cls, spec: HeadSpec) -> None:
        if spec.kind != cls.kind:
            raise InvalidAdapterError(
                f"task head {spec.task!r}: kind {spec.kind!r} is not {cls.kind!r}")
        if len(spec.labels) < 2:
            raise InvalidAdapterError(
                f"task head {spec.task!r}: a classification head needs at least 2 labels")
        spec.param_int("mlp_hidden", 256)
        spec.param_float("label_smoothing", 0.0, 0.0, 0.5)

    def forward(self, hidden: torch.Tensor) -> HeadOutputs:
        x = self.norm(self.pool(hidden))
        return {"logits": self.fc2(F.gelu(self.fc1(x)))}

    def loss(self, outputs: HeadOutputs, targets: Sequence[int]) -> torch.Tensor:
        """Cross-entropy against label indices."""
        target = torch.as_tensor(list(targets), dtype=torch.long, device=outputs["logits"].device)
        return F.cross_entropy(outputs["logits"], target, label_smoothing=self.label_smoothing)

    def predict(self, outputs: HeadOutputs) -> torch.Tensor:
        """Predicted label index per batch row ``[batch]``."""
        return outputs["logits"].argmax(dim=-1)

    def decode(self, outputs: HeadOutputs, index: int) -> HeadResult:
        probs = outputs["logits"][index].float().softmax(dim=-1).tolist()
        best = max(range(len(probs)), key=lambda i: probs[i])
        return HeadResult(kind=self.kind, label=self.labels[best],
                          scores=dict(zip(self.labels, probs, strict=True)))
