"""PagePool: null page, all-or-nothing allocation, eviction order, hashed free pages, invariants."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from valora.kv_cache.page_pool import NULL_PAGE, PagePool


def _hash(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def test_null_page_is_never_handed_out() -> None:
    pool = PagePool(num_pages=6, page_size=4)
    pages = pool.allocate(5)
    assert pages is not None
    assert sorted(pages) == [1, 2, 3, 4, 5]
    assert NULL_PAGE not in pages
    assert pool.num_free_pages == 0
    assert pool.usage == 1.0
    pool.check_invariants()


def test_allocate_is_all_or_nothing() -> None:
    pool = PagePool(num_pages=4, page_size=4)
    assert pool.allocate(4) is None
    assert pool.num_free_pages == 3
    assert pool.allocate(3) is not None
    assert pool.allocate(1) is None
    pool.check_invariants()


def test_free_evicts_the_tail_of_a_sequence_first() -> None:
    pool = PagePool(num_pages=5, page_size=4)
    table = pool.allocate(3)
    assert table == [1, 2, 3]
    pool.free(table)
    # Page 4 was free before; the freed table joins behind it, last page first.
    assert pool.allocate(4) == [4, 3, 2, 1]


def test_hashed_page_survives_free_until_reallocated() -> None:
    pool = PagePool(num_pages=3, page_size=4)
    (page,) = pool.allocate(1) or []
    assert pool.cache_page(page, _hash("a"))
    pool.free([page])
    assert pool.lookup(_hash("a")) == page
    assert pool.num_free_pages == 2

    pool.touch([page])  # prefix hit revives it
    assert pool.ref_count(page) == 1
    assert pool.num_free_pages == 1
    pool.free([page])

    assert pool.allocate(2) is not None  # evicts it for new content
    assert pool.lookup(_hash("a")) is None
    assert pool.page_hash(page) is None
    pool.check_invariants()


def test_shared_page_counts_references() -> None:
    pool = PagePool(num_pages=3, page_size=4)
    (page,) = pool.allocate(1) or []
    pool.touch([page])
    assert pool.ref_count(page) == 2
    pool.free([page])
    assert pool.num_free_pages == 1
    pool.free([page])
    assert pool.num_free_pages == 2
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([page])


def test_duplicate_hash_keeps_the_first_page() -> None:
    pool = PagePool(num_pages=4, page_size=4)
    first, second = pool.allocate(2) or []
    assert pool.cache_page(first, _hash("x"))
    assert not pool.cache_page(second, _hash("x"))
    assert pool.lookup(_hash("x")) == first
    assert pool.page_hash(second) is None
    pool.check_invariants()


def test_cache_page_rejects_free_pages_and_bad_ids() -> None:
    pool = PagePool(num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="free"):
        pool.cache_page(1, _hash("y"))
    with pytest.raises(ValueError, match="out of range"):
        pool.touch([NULL_PAGE])
    with pytest.raises(ValueError, match="out of range"):
        pool.free([4])


def test_prefix_caching_off_never_finds_pages() -> None:
    pool = PagePool(num_pages=4, page_size=4, enable_prefix_caching=False)
    (page,) = pool.allocate(1) or []
    assert not pool.cache_page(page, _hash("z"))
    assert pool.lookup(_hash("z")) is None


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / free / touch / cache sequences against a model of page ownership."""

    @initialize(num_pages=st.integers(2, 12))
    def setup(self, num_pages: int) -> None:
        self.pool = PagePool(num_pages=num_pages, page_size=2)
        self.tables: list[list[int]] = []
        self.hashes: dict[bytes, int] = {}
        self.counter = 0

    @rule(count=st.integers(0, 5))
    def allocate(self, count: int) -> None:
        free_before = self.pool.num_free_pages
        pages = self.pool.allocate(count)
        if count > free_before:
            assert pages is None
            assert self.pool.num_free_pages == free_before
            return
        assert pages is not None and len(pages) == count
        self.hashes = {h: p for h, p in self.hashes.items() if p not in pages}
        self.tables.append(pages)

    @precondition(lambda self: bool(self.tables))
    @rule(index=st.integers(0, 100))
    def free(self, index: int) -> None:
        self.pool.free(self.tables.pop(index % len(self.tables)))

    @precondition(lambda self: bool(self.hashes))
    @rule(index=st.integers(0, 100))
    def touch_cached(self, index: int) -> None:
        block_hash = sorted(self.hashes)[index % len(self.hashes)]
        page = self.pool.lookup(block_hash)
        assert page == self.hashes[block_hash]
        self.pool.touch([page])
        self.tables.append([page])

    @precondition(lambda self: any(self.tables))
    @rule(index=st.integers(0, 100))
    def cache(self, index: int) -> None:
        pages = [p for table in self.tables for p in table]
        page = pages[index % len(pages)]
        self.counter += 1
        block_hash = _hash(f"h{self.counter}")
        if self.pool.cache_page(page, block_hash) and self.pool.page_hash(page) == block_hash:
            self.hashes[block_hash] = page

    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()
        held = [p for table in self.tables for p in table]
        for page in range(1, self.pool.num_pages):
            assert self.pool.ref_count(page) == held.count(page)
        assert self.pool.num_free_pages == self.pool.num_usable_pages - len(set(held))
        for block_hash, page in self.hashes.items():
            assert self.pool.lookup(block_hash) == page


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
