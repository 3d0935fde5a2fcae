"""Per-request page tables on top of the page pool, with prefix sharing.

A request's *page table* lists the pages holding its tokens in order: token ``t`` lives in page
``table[t // page_size]`` at offset ``t % page_size``. The manager holds one reference per page
per table, so a page shared by ``k`` requests through the prefix cache has ``ref_count == k``.

Invariants (``check_invariants``): each page's reference count equals the number of page tables
that hold it; no page appears twice in one table; ``len(table) * page_size`` covers the request's
allocated slots; the null page is in no table.
"""

from __future__ import annotations

from collections import Counter

from valora.kv_cache.block_hash import PageHash, adapter_key, extend_page_hashes
from valora.kv_cache.page_pool import NULL_PAGE, PagePool
from valora.request import Request


class KVCacheManager:
    """Allocate, share (prefix cache) and free the pages of running requests."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[PageHash]] = {}
        # Number of leading pages of each table already offered to the pool's hash index.
        self._num_registered: dict[str, int] = {}

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free_pages

    @property
    def num_usable_pages(self) -> int:
        return self.pool.num_usable_pages

    @property
    def usage(self) -> float:
        return self.pool.usage

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens of one sequence."""
        return -(-num_tokens // self.page_size)

    def page_table(self, request_id: str) -> list[int]:
        """A copy of the request's page table (empty when it holds no pages)."""
        return list(self._tables.get(request_id, ()))

    def get_computed_pages(self, request: Request) -> int:
        """Prefix lookup at (re)scheduling: share the longest run of already computed full pages.

        The request must hold no pages. Looks up the full pages of ``request.all_token_ids``
        (prompt, plus outputs when recomputing after preemption) in order and stops at the first
        miss; takes a reference on every hit. At least ``request.num_recompute_tail`` (>= 1) tokens
        are always left to compute so the model produces logits (or a task head its inputs). Sets ``request.num_cached_tokens`` and returns it.
        """
        if request.request_id in self._tables:
            raise ValueError(f"request {request.request_id!r} already holds pages")
        hits: list[int] = []
        hashes: list[PageHash] = []
        if self.pool.enable_prefix_caching:
            tail = max(1, request.num_recompute_tail)
            max_pages = max(0, request.num_tokens - tail) // self.page_size
            extend_page_hashes(hashes, request.all_token_ids, self.page_size, adapter_key(request),
                               request.images, max_pages)
            for block_hash in hashes:
                page = self.pool.lookup(block_hash)
                if page is None:
                    break
                hits.append(page)
        self.pool.touch(hits)
        self._tables[request.request_id] = hits
        self._hashes[request.request_id] = hashes
        self._num_registered[request.request_id] = len(hits)
        request.num_cached_tokens = len(hits) * self.page_size
        return request.num_cached_tokens

    def num_pages_to_allocate(self, request: Request, num_new_tokens: int) -> int:
        """New pages ``allocate_slots(request, num_new_tokens)`` would take."""
        table = self._tables.get(request.request_id, ())
        needed = self.pages_for_tokens(request.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(table))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the page table to hold ``num_computed_tokens + num_new_tokens`` tokens.

        All-or-nothing: returns ``False`` and changes nothing when the pool is short.
        """
        num_pages = self.num_pages_to_allocate(request, num_new_tokens)
        table = self._tables.setdefault(request.request_id, [])
        self._hashes.setdefault(request.request_id, [])
        self._num_registered.setdefault(request.request_id, 0)
        if num_pages == 0:
            return True
        pages = self.pool.allocate(num_pages)
        if pages is None:
            return False
        table.extend(pages)
        return True

    def cache_full_pages(self, request: Request) -> None:
        """After a step: hash the pages whose tokens all have K/V now and register them.

        Uses ``request.all_token_ids[:num_computed_tokens]``, so call it after
        ``num_computed_tokens`` was advanced.
        """
        if not self.pool.enable_prefix_caching:
            return
        request_id = request.request_id
        table = self._tables.get(request_id)
        if table is None:
            return
        num_full = min(request.num_computed_tokens // self.page_size, len(table))
        start = self._num_registered[request_id]
        if num_full <= start:
            return
        hashes = self._hashes[request_id]
        extend_page_hashes(hashes, request.all_token_ids, self.page_size, adapter_key(request),
                           request.images, num_full)
        for index in range(start, num_full):
            self.pool.cache_page(table[index], hashes[index])
        self._num_registered[request_id] = num_full

    def free(self, request: Request) -> None:
        """Give back every page of the request (idempotent; unknown requests are ignored)."""
        table = self._tables.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if table:
            self.pool.free(table)

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` when a page is owned twice or ref counts disagree with tables."""
        self.pool.check_invariants()
        owners: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            if len(set(table)) != len(table):
                raise RuntimeError(f"request {request_id!r} holds a page twice: {table}")
            if NULL_PAGE in table:
                raise RuntimeError(f"request {request_id!r} holds the null page")
            owners.update(table)
        for page in range(1, self.pool.num_pages):
            if self.pool.ref_count(page) != owners[page]:
                raise RuntimeError(f"page {page} has {self.pool.ref_count(page)} refs but "
                                   f"{owners[page]} owners")
