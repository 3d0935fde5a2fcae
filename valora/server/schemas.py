"""Pydantic models of the OpenAI request bodies valora accepts, and the parameters it refuses.

Every model forbids unknown fields (an unknown parameter is a 400 naming it). OpenAI parameters
valora does not implement are declared so that their *no-op* values (``n=1``, ``echo=false``,
``logit_bias={}`` ...) pass, and any other value is refused by ``check_supported`` with a message
naming the parameter: nothing is silently ignored. Fields marked *extension* are not OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from valora.server.errors import ParamError

_STRICT = ConfigDict(extra="forbid")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ImageURL(BaseModel):
    """``url``: ``data:image/...;base64,...``, ``file://`` (under the allowed directory) or http(s)
    (when remote images are enabled). ``detail`` other than ``auto`` is refused: the model's
    processor fixes the resolution."""

    model_config = _STRICT
    url: str
    detail: Literal["auto"] | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One chat turn; ``developer`` is treated as ``system``."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class _SamplingFields(BaseModel):
    """Sampling parameters shared by both endpoints."""

    model_config = _STRICT
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (0 = off)
    min_tokens: int = Field(default=0, ge=0)  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    skip_special_tokens: bool = True  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records; valora does not use it
    latency_target_s: float | None = Field(default=None, gt=0.0)  # extension: scheduler hint
    # OpenAI parameters valora refuses unless given their no-op value (see ``check_supported``).
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # a vLLM extension clients sometimes send


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings (one choice each), a
    list of token ids, or a list of such lists."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class LoadLoRARequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body, plus SGLang's ``pinned`` (keep the adapter
    decoded in host memory until it is unloaded)."""

    model_config = _STRICT
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    pinned: bool = False


class UnloadLoRARequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` is accepted and unused:
    adapters are named, not numbered)."""

    model_config = _STRICT
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# parameter -> (values that mean "off", why valora refuses anything else)
_NO_OP: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "valora returns one choice per prompt; send several requests instead"),
    "best_of": ((None, 1), "valora returns one choice per prompt"),
    "echo": ((None, False), "echoing the prompt is not supported"),
    "suffix": ((None, ""), "insertion (suffix) is not supported"),
    "logit_bias": ((None, {}), "logit bias is not supported"),
    "frequency_penalty": ((None, 0, 0.0), "frequency penalties are not supported"),
    "presence_penalty": ((None, 0, 0.0), "presence penalties are not supported"),
    "repetition_penalty": ((None, 1, 1.0), "repetition penalties are not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}), "structured output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning effort is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "service_tier": ((None, "auto", "default"), "service tiers are not supported"),
    "store": ((None, False), "storing completions is not supported"),
    "metadata": ((None, {}), "metadata is only stored with store=true, which is not supported"),
}


def check_supported(request: BaseModel) -> None:
    """Raise ``ParamError`` naming the first OpenAI parameter set to a value valora cannot
    honour."""
    fields = type(request).model_fields
    for name, (no_op, why) in _NO_OP.items():
        if name in fields:
            value = getattr(request, name)
            if value is not None and value not in no_op:
                raise ParamError(f"unsupported parameter '{name}'={value!r}: {why}", param=name)
    top_logprobs = getattr(request, "top_logprobs", None)
    if top_logprobs is not None and not getattr(request, "logprobs", False):
        raise ParamError("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    stream_options = getattr(request, "stream_options", None)
    if stream_options is not None and not getattr(request, "stream", False):
        raise ParamError("'stream_options' is only allowed with 'stream': true",
                         param="stream_options")
