"""The pool of KV cache pages: free queue, reference counts and the content-hash index.

A *page* holds the K/V of ``page_size`` consecutive tokens of one sequence. Pages are numbered
``0 .. num_pages - 1``; page 0 is the *null page*: never handed out, used to pad page tables.

Every usable page is in exactly one of two states:

- **used**: ``ref_count > 0`` (one reference per page table that holds it);
- **free**: ``ref_count == 0`` and the page sits in the free queue.

The free queue is ordered by eviction priority (front = evicted first). ``allocate`` takes pages
from the front; ``free`` appends pages whose count drops to zero at the back. A free page that is
full and hashed keeps its hash, so a later request with the same prefix can revive it with
``touch``; only when ``allocate`` hands it out for new content is its hash entry dropped.

Invariants (``check_invariants``): free + used == usable pages; no page in the free queue has a
reference; every unreferenced usable page is in the free queue; the null page is never free or
referenced; the hash index and the per-page hashes agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from valora.logger import get_logger

logger = get_logger(__name__)

NULL_PAGE = 0
"""Page id used as padding in page tables; never allocated."""


class PagePool:
    """Free queue + reference counts + hash index over ``num_pages`` pages (page 0 reserved)."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 2:
            raise ValueError(
                f"num_pages must be >= 2 (page 0 is the reserved null page), got {num_pages}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        # Insertion order is eviction order; values are unused.
        self._free_queue: OrderedDict[int, None] = OrderedDict(
            (page, None) for page in range(1, num_pages)
        )
        self._page_hash: dict[int, bytes] = {}
        self._hash_to_page: dict[bytes, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_pages(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free_queue)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable pages referenced by some page table, in ``[0, 1]``."""
        return self.num_used_pages / self.num_usable_pages

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    def page_hash(self, page: int) -> bytes | None:
        """The content hash registered for ``page``, or ``None``."""
        return self._page_hash.get(page)

    def lookup(self, block_hash: bytes) -> int | None:
        """The page (used or free) whose K/V has chained hash ``block_hash``, or ``None``."""
        if not self.enable_prefix_caching:
            return None
        return self._hash_to_page.get(block_hash)

    # ---------------------------------------------------------------- mutations
    def allocate(self, num_pages: int) -> list[int] | None:
        """Take ``num_pages`` pages from the front of the free queue, each with one reference.

        All-or-nothing: returns ``None`` (and changes nothing) when fewer pages are free. A page
        that still carried a hash from earlier content loses it (evicted from the prefix cache).
        """
        if num_pages < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({num_pages})")
        if num_pages > len(self._free_queue):
            return None
        pages: list[int] = []
        for _ in range(num_pages):
            page, _unused = self._free_queue.popitem(last=False)
            self._evict_hash(page)
            self._ref_counts[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference from each page of one page table (``pages`` in table order).

        Pages reaching zero join the back of the free queue, **last page first**: a sequence's
        tail is the least likely to be shared, so it is evicted before its head.
        """
        for page in reversed(pages):
            self._check_page(page)
            count = self._ref_counts[page]
            if count <= 0:
                raise ValueError(f"page {page} freed more often than referenced")
            self._ref_counts[page] = count - 1
            if count == 1:
                self._free_queue[page] = None

    def touch(self, pages: Iterable[int]) -> None:
        """Add one reference to each page (prefix-cache hits); free pages leave the free queue."""
        for page in pages:
            self._check_page(page)
            if self._ref_counts[page] == 0:
                del self._free_queue[page]
            self._ref_counts[page] += 1

    def cache_page(self, page: int, block_hash: bytes) -> bool:
        """Register a full, referenced page under its chained content hash.

        Returns whether the page is now findable by ``lookup``. A page already hashed keeps its
        hash; when another page already holds ``block_hash`` (the same prefix computed twice),
        the index keeps that one and this page stays unhashed.
        """
        if not self.enable_prefix_caching:
            return False
        self._check_page(page)
        if self._ref_counts[page] <= 0:
            raise ValueError(f"page {page} is free; only pages in use can be cached")
        known = self._page_hash.get(page)
        if known is not None:
            return known == block_hash
        if block_hash in self._hash_to_page:
            return False
        self._page_hash[page] = block_hash
        self._hash_to_page[block_hash] = page
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after the model weights changed)."""
        self._page_hash.clear()
        self._hash_to_page.clear()

    # ---------------------------------------------------------------- internals
    def _evict_hash(self, page: int) -> None:
        block_hash = self._page_hash.pop(page, None)
        if block_hash is not None:
            del self._hash_to_page[block_hash]

    def _check_page(self, page: int) -> None:
        if not 0 < page < self.num_pages:
            raise ValueError(f"page id {page} is out of range 1..{self.num_pages - 1}")

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` naming the first broken invariant (see module docstring)."""
        problems: list[str] = []
        if self._ref_counts[NULL_PAGE] != 0 or NULL_PAGE in self._free_queue:
            problems.append("the null page is referenced or free")
        used = sum(1 for page in range(1, self.num_pages) if self._ref_counts[page] > 0)
        if used + len(self._free_queue) != self.num_usable_pages:
            problems.append(f"free ({len(self._free_queue)}) + used ({used}) != "
                            f"usable ({self.num_usable_pages})")
        for page in self._free_queue:
            if self._ref_counts[page] != 0:
                problems.append(
                    f"page {page} is in the free queue with {self._ref_counts[page]} refs")
        if any(count < 0 for count in self._ref_counts):
            problems.append("negative reference count")
        for page, block_hash in self._page_hash.items():
            if self._hash_to_page.get(block_hash) != page:
                problems.append(f"hash index disagrees for page {page}")
        if len(self._hash_to_page) != len(self._page_hash):
            problems.append("hash index has entries without a page")
        if problems:
            raise RuntimeError("page pool invariant broken: " + "; ".join(problems))
