"""Turn what a caller asks for (prompt or chat messages, images, adapter, sampling) into a
validated engine ``Request``: tokenised, image placeholders expanded, images preprocessed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from valora.config import ImageConfig
from valora.errors import InvalidRequestError, PromptTooLongError
from valora.multimodal.image_io import load_image
from valora.multimodal.processor import ImageProcessor
from valora.multimodal.prompt import build_chat_prompt, expand_image_placeholders
from valora.request import ImageSpan, Request
from valora.sampling_params import SamplingParams

ImageSource = str | bytes | Path | Image.Image


@dataclass
class GenerateRequest:
    """One request as a caller states it. Exactly one of ``prompt``, ``messages`` and
    ``prompt_token_ids`` is given. A raw ``prompt`` marks each image with the model's image token
    (``<image>``) in order; chat ``messages`` use image parts (``{"type": "image"}`` with
    ``images`` supplied, or ``{"type": "image_url", ...}`` sources). ``task`` picks a named task
    head of a fused adapter; without it the adapter's default head (if any) answers."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    images: Sequence[ImageSource] = ()
    adapter: str | None = None
    task: str | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    latency_target_s: float | None = None


@dataclass
class ModelLimits:
    """What the input processor needs to know about the served model."""

    max_model_len: int
    image_token_id: int | None
    num_image_tokens: int | None
    eos_token_ids: tuple[int, ...]


class InputProcessor:
    """Stateless apart from the tokenizer and image processor it wraps."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: ImageProcessor | None,
        limits: ModelLimits,
        image_config: ImageConfig,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.limits = limits
        self.image_config = image_config

    def process(self, spec: GenerateRequest) -> Request:
        """Validate and convert; raises a typed ``InvalidRequestError`` subclass on bad input."""
        given = [x is not None for x in (spec.prompt, spec.messages, spec.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages or prompt_token_ids")
        sources = list(spec.images)
        prompt = spec.prompt
        if spec.messages is not None:
            prompt, message_sources = build_chat_prompt(self.tokenizer, spec.messages)
            sources = message_sources + sources if message_sources else sources
        if len(sources) > self.image_config.max_images_per_request:
            raise InvalidRequestError(
                f"{len(sources)} images in one request; the limit is {self.image_config.max_images_per_request}"
            )
        if spec.prompt_token_ids is not None:
            token_ids = [int(t) for t in spec.prompt_token_ids]
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in token_ids):
                raise InvalidRequestError(f"prompt_token_ids must lie in [0, {vocab})")
        else:
            assert prompt is not None
            token_ids = list(self.tokenizer(prompt).input_ids)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        images: list[ImageSpan] = []
        if sources:
            if self.image_processor is None or self.limits.image_token_id is None:
                raise InvalidRequestError("this model does not accept images")
            loaded = [load_image(source, self.image_config) for source in sources]
            token_ids, images = expand_image_placeholders(
                token_ids,
                self.limits.image_token_id,
                int(self.limits.num_image_tokens or 0),
                [image.digest for image in loaded],
            )
            for span, image in zip(images, loaded, strict=True):
                span.pixel_values = self.image_processor(image.image)
        elif self.limits.image_token_id is not None and self.limits.image_token_id in token_ids:
            raise InvalidRequestError("the prompt has an image placeholder but no image was given")
        if len(token_ids) >= self.limits.max_model_len:
            raise PromptTooLongError(
                f"the prompt is {len(token_ids)} tokens (image tokens included); the model's context is "
                f"{self.limits.max_model_len} tokens and at least one must remain for the output"
            )
        eos = () if spec.sampling_params.ignore_eos else self.limits.eos_token_ids
        return Request(
            request_id=spec.request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            sampling_params=spec.sampling_params,
            adapter_name=spec.adapter,
            task=spec.task,
            images=images,
            prompt=prompt,
            latency_target_s=spec.latency_target_s,
            eos_token_ids=eos,
        )
