"""Image placeholders in prompts: chat messages → template text, and placeholder expansion.

``build_chat_prompt`` renders OpenAI-style messages with the tokenizer's chat template, one
image placeholder per image part. ``expand_image_placeholders`` then turns each single
placeholder token into the run of ``num_image_tokens`` tokens the model fills with image
features, recording an :class:`ImageSpan` per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from valora.errors import InvalidRequestError, ValoraError
from valora.multimodal.image_io import ImageSource
from valora.request import ImageSpan

DEFAULT_IMAGE_TOKEN = "<image>"
_SOURCE_KEYS = ("image", "url", "path")  # Hugging Face style {"type": "image", "url": ...}


class ChatPrompt(NamedTuple):
    """Rendered template text and the image sources carried by the messages, in order."""

    text: str
    image_sources: list[ImageSource]


def expand_image_placeholders(
    token_ids: Sequence[int],
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    digests: Sequence[str],
) -> tuple[list[int], list[ImageSpan]]:
    """Replace the ``i``-th ``image_token_id`` by ``num_image_tokens`` (or ``[i]``) copies.

    Every occurrence of ``image_token_id`` is one image, so adjacent placeholders are adjacent
    images: already-expanded runs are NOT recognised (a pre-expanded prompt fails the count
    check). Raises :class:`InvalidRequestError` when the number of placeholders differs from
    ``len(digests)``. Spans' offsets index the expanded sequence.
    """
    positions = [i for i, token in enumerate(token_ids) if token == image_token_id]
    if len(positions) != len(digests):
        raise InvalidRequestError(f"the prompt has {len(positions)} image placeholder(s) but "
                                  f"{len(digests)} image(s) were given; they must match")
    counts = ([num_image_tokens] * len(digests) if isinstance(num_image_tokens, int)
              else list(num_image_tokens))
    if len(counts) != len(digests) or any(c <= 0 for c in counts):
        raise ValoraError(f"num_image_tokens {num_image_tokens!r} must be positive, one per image "
                          f"({len(digests)} images)")
    expanded: list[int] = []
    spans: list[ImageSpan] = []
    start = 0
    for position, count, digest in zip(positions, counts, digests, strict=True):
        expanded.extend(token_ids[start:position])
        spans.append(ImageSpan(offset=len(expanded), length=count, digest=digest))
        expanded.extend([image_token_id] * count)
        start = position + 1
    expanded.extend(token_ids[start:])
    return expanded, spans


def build_chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                      image_token: str | None = None,
                      add_generation_prompt: bool | None = None) -> ChatPrompt:
    """Render ``messages`` with the tokenizer's chat template.

    ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
    ``{"type": "image"}`` (its image is supplied separately by the caller) or
    ``{"type": "image_url", "image_url": {"url": ...} | str}``; an ``image`` part may also carry
    its source under ``image``/``url``/``path``. Each image part becomes one ``image_token``
    placeholder. ``image_sources`` lists the sources carried by the parts, in order; a request
    may not mix carried and separately supplied images (their order would be ambiguous).
    Templates that only accept string content get the text with placeholders inlined.
    ``add_generation_prompt`` defaults to "the last message is not the assistant's".
    """
    token = image_token or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
    if not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model has no chat template; send a raw prompt instead")
    structured, flat, sources, num_images = _normalise(messages, token)
    if sources and len(sources) != num_images:
        raise InvalidRequestError(
            f"{len(sources)} image part(s) carry a source (image_url) and "
            f"{num_images - len(sources)} do not; give every image the same way")
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1].get("role") != "assistant"
    rejections: list[InvalidRequestError] = []
    for candidate in (structured, flat):
        try:
            text = _render(tokenizer, candidate, add_generation_prompt)
        except InvalidRequestError as exc:  # e.g. a template that cannot iterate content parts
            rejections.append(exc)
            continue
        if text.count(token) == num_images:
            return ChatPrompt(text, sources)
    if len(rejections) == 2:
        raise rejections[-1]
    raise InvalidRequestError(f"the chat template does not place one {token} per image part "
                              f"({num_images} expected)")


def _normalise(messages: Sequence[Mapping[str, Any]], token: str
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[ImageSource], int]:
    """Validate messages; return (structured, string-only) forms, carried sources, image count."""
    structured: list[dict[str, Any]] = []
    flat: list[dict[str, Any]] = []
    sources: list[ImageSource] = []
    num_images = 0
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{index}] must be an object with a string role")
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if content is None or isinstance(content, str):
            parts = [{"type": "text", "text": content or ""}]
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                where = f"messages[{index}].content[{part_index}]"
                parts.append(_normalise_part(part, where, sources))
        else:
            raise InvalidRequestError(f"messages[{index}].content must be a string or a list")
        for part in parts:
            if part["type"] == "text" and token in part["text"]:
                raise InvalidRequestError(f"messages[{index}] text contains the image "
                                          f"placeholder {token}; use image parts instead")
        images = sum(1 for p in parts if p["type"] == "image")
        num_images += images
        texts = [p["text"] for p in parts if p["type"] == "text"]
        rest = {k: v for k, v in message.items() if k != "content"}
        structured.append({**rest, "content": parts if images else "\n".join(texts)})
        inlined = "".join(f"{token}\n" if p["type"] == "image" else p["text"] for p in parts)
        flat.append({**rest, "content": inlined if images else "\n".join(texts)})
    return structured, flat, sources, num_images


def _normalise_part(part: object, where: str, sources: list[ImageSource]) -> dict[str, Any]:
    if not isinstance(part, Mapping):
        raise InvalidRequestError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where} is a text part without a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(f"{where} is an image_url part without a url")
        sources.append(url)
        return {"type": "image"}
    if kind == "image":
        for key in _SOURCE_KEYS:
            if part.get(key) is not None:
                sources.append(part[key])
                break
        return {"type": "image"}
    raise InvalidRequestError(f"{where} has unsupported type {kind!r}; supported: text, image, "
                              f"image_url")


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own errors (e.g. raise_exception in a template)
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
    if not isinstance(text, str):
        raise ValoraError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
