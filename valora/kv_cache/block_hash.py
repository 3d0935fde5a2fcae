"""Chained content hashes of full KV pages: the prefix-cache keys.

Semantics::

    hash_0 = sha256(ROOT          || tokens(page 0) || extra_keys(page 0))
    hash_i = sha256(hash_{i-1}    || tokens(page i) || extra_keys(page i))

``extra_keys(page i)`` are everything besides the token ids that changes the page's K/V:

- the request's adapter digest (on every page; ``None`` = base model), because LoRA changes the
  K/V projections;
- for each image whose placeholder span overlaps page ``i``: ``(image digest, span start relative
  to the page start, span length)``, because placeholder token ids are the same for every image.

Because each hash covers its parent, two requests get equal ``hash_i`` only when pages ``0..i``
agree in tokens, adapter and images. Only full pages are hashed. The encoding is explicit
(length-prefixed, little-endian) and uses sha256, so hashes are equal across processes and runs
(Python's ``hash()`` is salted per process and never used here).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from valora.request import ImageSpan, Request

PageHash = bytes

_ROOT = hashlib.sha256(b"valora.kv_cache.page_hash.v1").digest()

ImageKey = tuple[str, int, int]
"""``(image digest, span start relative to the page start, span length)``."""


def adapter_key(request: Request) -> str | None:
    """The adapter identity used in page hashes: its digest; the name when no digest is known.

    The engine sets ``adapter_digest``; falling back to the name keeps two different adapters
    from ever sharing pages when a caller forgot the digest.
    """
    if request.adapter_digest is not None:
        return request.adapter_digest
    if request.adapter_name is not None:
        return f"name:{request.adapter_name}"
    return None


def image_keys(
    images: Sequence[ImageSpan], page_index: int, page_size: int
) -> tuple[ImageKey, ...]:
    """Keys of the images whose placeholder span overlaps page ``page_index``, in prompt order."""
    page_start = page_index * page_size
    page_end = page_start + page_size
    return tuple(
        (image.digest, image.offset - page_start, image.length)
        for image in images
        if image.offset < page_end and image.offset + image.length > page_start
    )


def _encode_str(value: str | None) -> bytes:
    if value is None:
        return struct.pack("<q", -1)
    raw = value.encode("utf-8")
    return struct.pack("<q", len(raw)) + raw


def hash_page(
    parent: PageHash | None,
    token_ids: Sequence[int],
    adapter: str | None,
    images: Sequence[ImageKey] = (),
) -> PageHash:
    """One link of the chain: the hash of a page given its parent's hash (``None`` = first page)."""
    hasher = hashlib.sha256(_ROOT if parent is None else parent)
    hasher.update(struct.pack(f"<q{len(token_ids)}q", len(token_ids), *token_ids))
    hasher.update(_encode_str(adapter))
    hasher.update(struct.pack("<q", len(images)))
    for digest, relative_start, length in images:
        hasher.update(_encode_str(digest))
        hasher.update(struct.pack("<qq", relative_start, length))
    return hasher.digest()


def extend_page_hashes(
    hashes: list[PageHash],
    token_ids: Sequence[int],
    page_size: int,
    adapter: str | None,
    images: Sequence[ImageSpan] = (),
    max_pages: int | None = None,
) -> list[PageHash]:
    """Append to ``hashes`` the hashes of the full pages of ``token_ids`` it does not cover yet.

    ``hashes`` must be the chain of the first ``len(hashes)`` pages of the same sequence.
    ``max_pages`` caps how many pages the chain covers. Returns ``hashes`` (mutated in place).
    """
    num_full = len(token_ids) // page_size
    if max_pages is not None:
        num_full = min(num_full, max_pages)
    for index in range(len(hashes), num_full):
        parent = hashes[index - 1] if index > 0 else None
        page_tokens = token_ids[index * page_size:(index + 1) * page_size]
        hashes.append(hash_page(parent, page_tokens, adapter, image_keys(images, index, page_size)))
    return hashes


def request_page_hashes(
    request: Request, page_size: int, max_pages: int | None = None
) -> list[PageHash]:
    """Hashes of the full pages of ``request.all_token_ids`` (capped at ``max_pages``)."""
    return extend_page_hashes([], request.all_token_ids, page_size, adapter_key(request),
                              request.images, max_pages)
