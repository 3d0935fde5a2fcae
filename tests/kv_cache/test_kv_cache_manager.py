"""KVCacheManager: page tables, prefix sharing with ref counts, adapter/image isolation."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.kv_cache.page_pool import PagePool
from valora.request import ImageSpan, Request

PAGE = 4
MakeRequest = Callable[..., Request]


def _manager(num_pages: int = 32, prefix_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(PagePool(num_pages, PAGE, prefix_caching))


def _compute_prompt(manager: KVCacheManager, request: Request) -> None:
    """What the scheduler does for a first run of the whole prompt in one step."""
    request.num_computed_tokens = manager.get_computed_pages(request)
    assert manager.allocate_slots(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_pages(request)
    manager.check_invariants()


def test_page_table_grows_to_cover_the_tokens(make_request: MakeRequest) -> None:
    manager = _manager()
    request = make_request(range(10))
    assert manager.get_computed_pages(request) == 0
    assert manager.allocate_slots(request, 10)
    assert len(manager.page_table(request.request_id)) == 3
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2)  # 12 tokens still fit 3 pages
    assert len(manager.page_table(request.request_id)) == 3
    assert manager.allocate_slots(request, 3)
    assert len(manager.page_table(request.request_id)) == 4
    manager.check_invariants()


def test_allocate_slots_is_all_or_nothing(make_request: MakeRequest) -> None:
    manager = _manager(num_pages=4)  # 3 usable pages
    request = make_request(range(20))
    manager.get_computed_pages(request)
    assert not manager.allocate_slots(request, 20)
    assert manager.page_table(request.request_id) == []
    assert manager.num_free_pages == 3
    assert manager.allocate_slots(request, 12)
    assert manager.num_free_pages == 0


def test_same_prefix_shares_pages(make_request: MakeRequest) -> None:
    manager = _manager()
    first = make_request(range(14))
    _compute_prompt(manager, first)
    second = make_request([*range(12), 99, 98, 97])
    assert manager.get_computed_pages(second) == 12
    assert second.num_cached_tokens == 12
    shared = manager.page_table(first.request_id)[:3]
    assert manager.page_table(second.request_id) == shared
    assert all(manager.pool.ref_count(page) == 2 for page in shared)
    manager.check_invariants()

    manager.free(first)
    assert all(manager.pool.ref_count(page) == 1 for page in shared)
    manager.free(second)
    assert manager.num_free_pages == manager.num_usable_pages
    manager.check_invariants()


def test_freed_pages_still_serve_prefix_hits(make_request: MakeRequest) -> None:
    manager = _manager()
    first = make_request(range(9))
    _compute_prompt(manager, first)
    manager.free(first)
    again = make_request(range(9))
    assert manager.get_computed_pages(again) == 8
    assert manager.num_free_pages == manager.num_usable_pages - 2


def test_never_the_whole_prompt(make_request: MakeRequest) -> None:
    manager = _manager()
    _compute_prompt(manager, make_request(range(8)))
    exact = make_request(range(8))  # two full pages, both cached
    assert manager.get_computed_pages(exact) == 4  # the last page is recomputed for logits


def test_different_adapter_does_not_share(make_request: MakeRequest) -> None:
    manager = _manager()
    _compute_prompt(manager, make_request(range(12), adapter="a"))
    assert manager.get_computed_pages(make_request(range(13), adapter="b")) == 0
    assert manager.get_computed_pages(make_request(range(13))) == 0
    assert manager.get_computed_pages(make_request(range(13), adapter="a")) == 12


def test_different_image_does_not_share_from_its_page_on(make_request: MakeRequest) -> None:
    manager = _manager()
    tokens = [1, 2, 3, 4, 5, 7, 7, 7, 9, 10, 11, 12, 13]
    _compute_prompt(manager, make_request(tokens, images=[ImageSpan(5, 3, "cat")]))
    assert manager.get_computed_pages(make_request(tokens, images=[ImageSpan(5, 3, "dog")])) == 4
    assert manager.get_computed_pages(make_request(tokens, images=[ImageSpan(5, 3, "cat")])) == 12


def test_only_computed_full_pages_are_cached(make_request: MakeRequest) -> None:
    manager = _manager()
    request = make_request(range(13))
    manager.get_computed_pages(request)
    assert manager.allocate_slots(request, 6)  # a chunk of 6 tokens: one full page computed
    request.num_computed_tokens = 6
    manager.cache_full_pages(request)
    assert manager.get_computed_pages(make_request(range(13))) == 4


def test_generated_tokens_fill_pages_too(make_request: MakeRequest) -> None:
    manager = _manager()
    request = make_request(range(3))
    _compute_prompt(manager, request)
    for token in (50, 51, 52):
        request.output_token_ids.append(token)
        assert manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        manager.cache_full_pages(request)
    recompute = make_request([0, 1, 2, 50, 51, 52, 53])
    assert manager.get_computed_pages(recompute) == 4


def test_prefix_caching_off(make_request: MakeRequest) -> None:
    manager = _manager(prefix_caching=False)
    _compute_prompt(manager, make_request(range(12)))
    assert manager.get_computed_pages(make_request(range(12))) == 0


def test_free_is_idempotent_and_lookup_needs_no_pages(make_request: MakeRequest) -> None:
    manager = _manager()
    request = make_request(range(5))
    manager.free(request)
    _compute_prompt(manager, request)
    with pytest.raises(ValueError, match="already holds pages"):
        manager.get_computed_pages(request)
    manager.free(request)
    manager.free(request)
    assert manager.num_free_pages == manager.num_usable_pages
    manager.check_invariants()
