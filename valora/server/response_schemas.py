"""Pydantic models of the OpenAI response bodies valora sends (plus its ``valora_*`` extensions).

Extension fields are left out of the JSON when unset, so plain clients see OpenAI's shapes:
``valora_head_result`` carries a task-head adapter's structured answer (scores, boxes) next to
its label, which is the message content.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field


def _omit_none() -> Any:
    return Field(default=None, exclude_if=lambda value: value is None)


def _now() -> Any:
    """``created``: the Unix time at which the body is built."""
    return Field(default_factory=lambda: int(time.time()))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    valora_head_result: dict[str, Any] | None = _omit_none()


class _ChatChoiceBase(BaseModel):
    """What a chat choice and a streamed chat choice share (each adds its message part)."""

    index: int
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChoice(_ChatChoiceBase):
    message: ChatMessageOut


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = _now()
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    valora_head_result: dict[str, Any] | None = _omit_none()


class ChatChunkChoice(_ChatChoiceBase):
    delta: DeltaMessage


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = _now()
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omit_none()


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    valora_head_result: dict[str, Any] | None = _omit_none()


class CompletionResponse(BaseModel):
    """Both the full response and a streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = _now()
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _omit_none()


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``. ``parent`` is the base model for adapters; ``rank``,
    ``residency`` (``device`` = in a resident LoRA slot, ``cpu`` = decoded in host memory,
    ``none`` = on disk only), ``digest`` and ``pinned`` (registered pinned: start-up adapters)
    are valora extensions."""

    id: str
    object: Literal["model"] = "model"
    created: int = _now()
    owned_by: str = "valora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = _omit_none()
    rank: int | None = _omit_none()
    residency: str | None = _omit_none()
    digest: str | None = _omit_none()
    pinned: bool | None = _omit_none()


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
