"""Dense auxiliary supervision of the image tokens (training only; never shipped).

Answer tokens alone give a from-scratch vision tower a weak, slow signal. Generated scenes know
what is drawn in every pixel, so each image token (one per patch) also gets three targets, read
by linear heads from the projector's output — the very vectors the decoder sees:

- ``colour``: 0 background, 1.. the colour of the object covering the patch (``COLOURS`` order);
- ``what``: 0 background, then shapes, printed/handwritten digits, words (``WHAT_NAMES`` order);
- ``centre``: 1 on the patch holding an object's centre, else 0 (what counting needs);
- ``column`` and ``row``: the patch's own grid coordinates, on every patch (what left/right and
  "where" need: the position must be readable from the token itself, not only from its index).

A patch covered by an object for at least ``COVERED`` of its pixels takes that object's labels;
one covered less, but not zero, is ambiguous and ignored (-100); so are all targets of images
without a mask (photos) and the colour of uncoloured ink (handwritten digits). The heads are
discarded after training; they only shape the vision tower and projector.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from valora.training.scenes import COLOURS, SHAPES, WORDS, Example

IGNORE_INDEX = -100
COVERED = 0.2
WHAT_NAMES = ("background", *SHAPES, *(f"digit {d}" for d in range(10)),
              *(f"word {w}" for w in WORDS))
_WHAT_INDEX = {name: i for i, name in enumerate(WHAT_NAMES)}
_COLOUR_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}
NUM_TARGETS = 5  # colour, what, centre, column, row


def patch_targets(example: Example, image_size: int, patch_size: int) -> np.ndarray:
    """(5, G²) int64 targets (colour, what, centre, column, row) for a G×G grid, row-major."""
    grid = image_size // patch_size
    targets = np.full((NUM_TARGETS, grid * grid), IGNORE_INDEX, dtype=np.int64)
    if example.mask is None or example.mask.shape != (image_size, image_size):
        return targets
    tiled = example.mask.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3)
    blocks = tiled.reshape(grid * grid, patch_size * patch_size)
    area = patch_size * patch_size
    targets[0:3, :] = 0
    targets[3] = np.tile(np.arange(grid), grid)
    targets[4] = np.repeat(np.arange(grid), grid)
    for index, obj in enumerate(example.objects):
        coverage = (blocks == index + 1).sum(axis=1) / area
        owned = coverage >= COVERED
        partial = (coverage > 0) & ~owned
        colour = _COLOUR_INDEX[obj.colour] if obj.colour is not None else IGNORE_INDEX
        targets[0, owned] = colour
        targets[1, owned] = _WHAT_INDEX[obj.what]
        targets[0:2, partial & (targets[1] == 0)] = IGNORE_INDEX
        col = min(grid - 1, max(0, int(obj.x) // patch_size))
        row = min(grid - 1, max(0, int(obj.y) // patch_size))
        targets[2, row * grid + col] = 1
    return targets


class AuxHeads(nn.Module):
    """Linear heads over image-token embeddings: colour, what, centre, column, row logits."""

    def __init__(self, hidden_size: int, grid: int) -> None:
        super().__init__()
        self.colour = nn.Linear(hidden_size, len(COLOURS) + 1)
        self.what = nn.Linear(hidden_size, len(WHAT_NAMES))
        self.centre = nn.Linear(hidden_size, 2)
        self.column = nn.Linear(hidden_size, grid)
        self.row = nn.Linear(hidden_size, grid)

    def loss(self, image_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of the heads' mean cross-entropies; ``image_embeds`` (B, G², H), ``targets``
        (B, 5, G²)."""
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).float()
        total = image_embeds.new_zeros((), dtype=torch.float32)
        heads = (self.colour, self.what, self.centre, self.column, self.row)
        for index, head in enumerate(heads):
            labels = targets[:, index, :].reshape(-1)
            if bool((labels != IGNORE_INDEX).any()):
                total = total + nn.functional.cross_entropy(head(flat), labels,
                                                            ignore_index=IGNORE_INDEX)
        return total
