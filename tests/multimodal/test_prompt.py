"""Chat messages → template text with image placeholders, and placeholder expansion."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from valora.errors import InvalidRequestError
from valora.multimodal.prompt import build_chat_prompt, expand_image_placeholders

IMG = 4  # the tiny tokenizer's <image> id


def test_expand_replaces_each_placeholder_with_a_run() -> None:
    ids, spans = expand_image_placeholders([1, 7, IMG, 8, IMG, IMG, 9], IMG, 3, ["d0", "d1", "d2"])
    assert ids == [1, 7, IMG, IMG, IMG, 8] + [IMG] * 6 + [9]
    assert [(s.offset, s.length, s.digest) for s in spans] == [(2, 3, "d0"), (6, 3, "d1"),
                                                               (9, 3, "d2")]
    assert all(ids[s.offset:s.offset + s.length] == [IMG] * s.length for s in spans)


def test_expand_with_per_image_counts_and_without_images() -> None:
    ids, spans = expand_image_placeholders([IMG, 5, IMG], IMG, [2, 1], ["a", "b"])
    assert ids == [IMG, IMG, 5, IMG] and [(s.offset, s.length) for s in spans] == [(0, 2), (3, 1)]
    assert expand_image_placeholders([1, 2, 3], IMG, 5, []) == ([1, 2, 3], [])


@pytest.mark.parametrize(("ids", "digests", "message"), [
    ([1, IMG, 2], ["a", "b"], "has 1 image placeholder.* but 2 image"),
    ([1, IMG, IMG, 2], ["a"], "has 2 image placeholder.* but 1 image"),
    ([1, 2], ["a"], "has 0 image placeholder.* but 1 image"),
])
def test_expand_rejects_count_mismatch(ids: list[int], digests: list[str], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        expand_image_placeholders(ids, IMG, 3, digests)


def test_string_and_part_content_render_with_placeholders(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": "/tmp/second.png"}]},
    ]
    before = copy.deepcopy(messages)
    prompt = build_chat_prompt(tokenizer, messages)
    assert prompt.text == "Be brief.\nUSER: <image>\nWhat is this?<image>\n\nASSISTANT:"
    assert prompt.image_sources == ["data:image/png;base64,AAAA", "/tmp/second.png"]
    assert messages == before
    ids = tokenizer(prompt.text).input_ids
    assert ids.count(IMG) == 2
    expanded, spans = expand_image_placeholders(ids, IMG, 5, ["x", "y"])
    assert len(expanded) == len(ids) + 8 and expanded.count(IMG) == 10 and len(spans) == 2


def test_bare_image_parts_and_hf_style_sources(tokenizer: Any) -> None:
    bare = build_chat_prompt(tokenizer, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "hi"}]}])
    assert bare == ("USER: <image>\nhi\nASSISTANT:", [])
    carried = build_chat_prompt(tokenizer, [{"role": "user", "content": [
        {"type": "image", "url": "a.png"}, {"type": "image", "path": "b.png"}]}])
    assert carried.image_sources == ["a.png", "b.png"] and carried.text.count("<image>") == 2


def test_generation_prompt_follows_last_role(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert build_chat_prompt(tokenizer, messages).text == "USER: hi\nASSISTANT: yes</s>\n"
    assert build_chat_prompt(tokenizer, messages[:1]).text == "USER: hi\nASSISTANT:"
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "text", "text": "b"}]}]
    assert build_chat_prompt(tokenizer, text_parts).text == "USER: a\nb\nASSISTANT:"


def test_string_only_template_gets_inlined_placeholders(tokenizer: Any) -> None:
    plain = copy.copy(tokenizer)
    plain.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                           "{% endfor %}")
    prompt = build_chat_prompt(plain, [{"role": "user", "content": [
        {"type": "text", "text": "look "}, {"type": "image"}, {"type": "text", "text": "now"}]}])
    assert prompt.text == "[user] look <image>\nnow\n"


@pytest.mark.parametrize(("messages", "message"), [
    ([], "non-empty"),
    ([{"content": "hi"}], "string role"),
    ([{"role": "user", "content": 5}], "must be a string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported type 'audio'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "without a string 'text'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "without a url"),
    ([{"role": "user", "content": "see <image> here"}], "contains the image placeholder"),
    ([{"role": "user", "content": [{"type": "image"},
                                   {"type": "image_url", "image_url": {"url": "x.png"}}]}],
     "1 image part.* carry a source .* and 1 do not"),
])
def test_bad_messages(messages: list[dict[str, Any]], message: str, tokenizer: Any) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        build_chat_prompt(tokenizer, messages)


def test_template_errors_and_missing_template(tokenizer: Any) -> None:
    strict = copy.copy(tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        build_chat_prompt(strict, [{"role": "user", "content": "hi"}])
    none = copy.copy(tokenizer)
    none.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        build_chat_prompt(none, [{"role": "user", "content": "hi"}])
    dropping = copy.copy(tokenizer)
    dropping.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(InvalidRequestError, match="does not place one <image> per image part"):
        build_chat_prompt(dropping, [{"role": "user", "content": [{"type": "image"}]}])
