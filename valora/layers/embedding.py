"""Token embedding and the LM head (tied to the embedding or with its own weight).

``LMHead.forward(hidden)`` returns float32 logits ``hidden @ weight.T`` computed in the model
dtype and then upcast (what Hugging Face does before sampling). When tied, the head holds no
parameter of its own: it reads the embedding's ``weight`` at call time, so loading or merging
the embedding updates the head too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """``weight[input_ids]`` with ``weight: [vocab_size, hidden_size]``."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projection of final hidden states onto the vocabulary."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # A plain list keeps the tied embedding out of this module's parameters, so each tensor
        # has exactly one name (``...embed_tokens.weight``) for the loader.
        self._tied: list[VocabEmbedding] = [tied_to] if tied_to is not None else []
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def projection_weight(self) -> torch.Tensor:
        """The ``[vocab_size, hidden_size]`` matrix the head multiplies by (maybe the embedding)."""
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.projection_weight()).float()
