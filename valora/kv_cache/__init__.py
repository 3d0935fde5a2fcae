"""Paged KV cache bookkeeping: the page pool, content hashes and per-request page tables."""

from valora.kv_cache.block_hash import PageHash, hash_page, request_page_hashes
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.kv_cache.page_pool import NULL_PAGE, PagePool

__all__ = [
    "NULL_PAGE",
    "KVCacheManager",
    "PageHash",
    "PagePool",
    "hash_page",
    "request_page_hashes",
]
