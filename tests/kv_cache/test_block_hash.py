"""Chained page hashes: determinism, chaining, and the adapter / image extra keys."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from valora.kv_cache.block_hash import (
    adapter_key,
    extend_page_hashes,
    hash_page,
    image_keys,
    request_page_hashes,
)
from valora.request import ImageSpan, Request

PAGE = 4
TOKENS = list(range(100, 114))  # 3 full pages + 2 tokens


def _hashes(tokens: list[int], adapter: str | None = None,
            images: tuple[ImageSpan, ...] = ()) -> list[bytes]:
    return extend_page_hashes([], tokens, PAGE, adapter, images)


def test_only_full_pages_are_hashed() -> None:
    assert len(_hashes(TOKENS)) == 3
    assert len(_hashes(TOKENS[:3])) == 0
    assert len(extend_page_hashes([], TOKENS, PAGE, None, (), max_pages=2)) == 2


def test_hashes_are_deterministic_within_a_process() -> None:
    assert _hashes(TOKENS, "digest-a") == _hashes(list(TOKENS), "digest-a")
    assert len(set(_hashes(TOKENS))) == 3


def test_hashes_are_equal_across_processes_with_different_hash_seeds() -> None:
    code = ("from valora.kv_cache.block_hash import extend_page_hashes as e;"
            f"print(','.join(h.hex() for h in e([], {TOKENS!r}, {PAGE}, 'd', ())))")
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True)
        outputs.add(result.stdout.strip())
    assert outputs == {",".join(h.hex() for h in _hashes(TOKENS, "d"))}


def test_a_changed_token_changes_its_page_and_every_later_page() -> None:
    base = _hashes(TOKENS)
    changed = list(TOKENS)
    changed[5] += 1  # page 1
    other = _hashes(changed)
    assert other[0] == base[0]
    assert other[1] != base[1]
    assert other[2] != base[2]


def test_adapter_digest_changes_every_page() -> None:
    plain, first, second = _hashes(TOKENS), _hashes(TOKENS, "a"), _hashes(TOKENS, "b")
    for index in range(3):
        assert len({plain[index], first[index], second[index]}) == 3


def test_image_digest_changes_overlapping_and_later_pages_only() -> None:
    cat = (ImageSpan(offset=5, length=3, digest="cat"),)  # inside page 1
    dog = (ImageSpan(offset=5, length=3, digest="dog"),)
    with_cat, with_dog = _hashes(TOKENS, images=cat), _hashes(TOKENS, images=dog)
    without = _hashes(TOKENS)
    assert with_cat[0] == with_dog[0] == without[0]
    assert with_cat[1] != with_dog[1] and with_cat[1] != without[1]
    assert with_cat[2] != with_dog[2]


def test_image_position_matters() -> None:
    early = (ImageSpan(offset=4, length=3, digest="cat"),)
    late = (ImageSpan(offset=5, length=3, digest="cat"),)
    assert _hashes(TOKENS, images=early)[1] != _hashes(TOKENS, images=late)[1]


def test_image_keys_cover_every_overlapped_page() -> None:
    spans = [ImageSpan(offset=3, length=6, digest="img")]  # tokens 3..8: pages 0, 1, 2
    assert image_keys(spans, 0, PAGE) == (("img", 3, 6),)
    assert image_keys(spans, 1, PAGE) == (("img", -1, 6),)
    assert image_keys(spans, 2, PAGE) == (("img", -5, 6),)
    assert image_keys(spans, 3, PAGE) == ()


def test_hash_page_separates_parents_and_adapter_none() -> None:
    tokens = TOKENS[:PAGE]
    assert hash_page(None, tokens, None) != hash_page(None, tokens, "")
    root = hash_page(None, tokens, None)
    assert hash_page(root, tokens, None) != root


def test_request_hashes_use_digest_then_name(make_request: Callable[..., Request]) -> None:
    with_digest = make_request(TOKENS, adapter="x")
    assert adapter_key(with_digest) == "x"
    with_digest.adapter_digest = None
    assert adapter_key(with_digest) == "name:name-x"
    assert request_page_hashes(with_digest, PAGE) == _hashes(TOKENS, "name:name-x")


@settings(max_examples=50, deadline=None)
@given(tokens=st.lists(st.integers(0, 50), max_size=40), split=st.integers(0, 40))
def test_incremental_extension_matches_one_shot(tokens: list[int], split: int) -> None:
    images = (ImageSpan(offset=2, length=5, digest="i"),)
    partial = extend_page_hashes([], tokens[:split], PAGE, "a", images)
    extend_page_hashes(partial, tokens, PAGE, "a", images)
    assert partial == extend_page_hashes([], tokens, PAGE, "a", images)
