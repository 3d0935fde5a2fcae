"""The concrete content of a benchmark request: question text and images, built the same way
for the in-process and the HTTP driver (deterministic per request id and seed)."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
from PIL import Image

from valora.benchmarks.workload import BenchRequest

_WORDS = ("how", "many", "shapes", "are", "in", "the", "image", "what", "colour", "is", "square",
          "describe", "scene", "which", "object", "top", "left", "corner", "count", "people")
_QUESTIONS = {
    "short": "Answer in one word.",
    "long": "Describe the image in detail.",
    "frames": "These are frames of one video. What happens?",
}


def _rng(request: BenchRequest, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{request.request_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def question_text(request: BenchRequest, seed: int = 0) -> str:
    """``request.prompt_tokens`` filler words followed by the kind's question."""
    rng = _rng(request, seed)
    words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), request.prompt_tokens)]
    return " ".join([*words, _QUESTIONS[request.kind]])


def images(request: BenchRequest, seed: int = 0, size: int = 48) -> list[Image.Image]:
    """``request.num_images`` random RGB images (distinct per request, so no image-cache hits
    across requests; frames of one request are distinct too)."""
    rng = _rng(request, seed + 1)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(request.num_images)]


def chat_content(request: BenchRequest, seed: int = 0) -> list[dict[str, str]]:
    """The user message's parts for the in-process chat template: image slots, then the text."""
    parts: list[dict[str, str]] = [{"type": "image"} for _ in range(request.num_images)]
    parts.append({"type": "text", "text": question_text(request, seed)})
    return parts


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(request: BenchRequest, seed: int = 0) -> list[dict[str, object]]:
    """The OpenAI chat ``messages`` of the request (images as PNG data URLs)."""
    parts: list[dict[str, object]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(image)}}
        for image in images(request, seed)
    ]
    parts.append({"type": "text", "text": question_text(request, seed)})
    return [{"role": "user", "content": parts}]
