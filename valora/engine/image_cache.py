"""LRU cache of projected image embeddings, keyed by image digest.

Image tokens of one prompt may be computed over several steps (chunked prefill) or again after a
preemption; the vision tower runs once per distinct image while its embeddings stay cached.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


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
