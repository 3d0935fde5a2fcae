"""LRU cache of projected image embeddings, keyed by image digest.

Image tokens of one prompt may be computed over several steps (chunked prefill) or again after a
preemption; the vision tower runs once per distinct image while its embeddings stay cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from valora.engine.batch_builder import ImageRows


class ImageEmbeddingCache:
    """Bounded by total bytes; the most recently used entries survive."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> torch.Tensor | None:
        tensor = self._entries.get(digest)
        if tensor is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(digest)
        return tensor

    def put(self, digest: str, embeddings: torch.Tensor) -> None:
        size = embeddings.numel() * embeddings.element_size()
        if digest in self._entries or size > self.max_bytes:
            return
        while self._entries and self._bytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        self._entries[digest] = embeddings
        self._bytes += size

    def clear(self) -> None:
        """Drop every entry (hit and miss counts are kept)."""
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes


def step_image_embeddings(
    image_rows: list[ImageRows], cache: ImageEmbeddingCache,
    encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's ``(image_embeds, image_token_indices)``: the rows of each placed image's
    embedding and the flat tokens they replace. Images not in ``cache`` are encoded in one
    ``encode`` call (pixels ``[N, C, H, W]``) and cached; one too large to cache serves this
    step from its span."""
    missing = {p.span.digest: p.span for p in image_rows if cache.get(p.span.digest) is None}
    if missing:
        spans = list(missing.values())
        pixels = torch.stack([_pixels(s) for s in spans]).to(device, dtype)
        for span, embedding in zip(spans, encode(pixels), strict=True):
            cache.put(span.digest, embedding)
            if cache.get(span.digest) is None:  # too large to cache: keep for this step
                span.pixel_values = embedding
    pieces: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    for piece in image_rows:
        cached = cache.get(piece.span.digest)
        embedding = cached if cached is not None else piece.span.pixel_values
        pieces.append(embedding[piece.row_start : piece.row_end])
        count = piece.row_end - piece.row_start
        indices.append(torch.arange(piece.flat_start, piece.flat_start + count, device=device))
    return torch.cat(pieces), torch.cat(indices)


def _pixels(span: Any) -> torch.Tensor:
    if span.pixel_values is None:
        raise RuntimeError(
            f"image {span.digest[:12]} has no pixel values and no cached embedding"
        )
    return span.pixel_values
