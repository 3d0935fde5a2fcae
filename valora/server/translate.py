"""OpenAI request bodies → engine ``GenerateRequest``s: model name, sampling parameters, messages.

The ``model`` field names the base model (``served_model_name``), an adapter, or ``base:adapter``.
Chat image parts are fetched under the media policy (``media.py``) and handed to the engine as
bytes, in order, with ``{"type": "image"}`` placeholders left in the message content.
"""

from __future__ import annotations

from typing import Any

from valora.engine.inputs import GenerateRequest
from valora.errors import AdapterNotFoundError, InvalidRequestError
from valora.sampling_params import SamplingParams
from valora.server.errors import ParamError
from valora.server.media import resolve_image_url
from valora.server.schemas import ChatCompletionRequest, CompletionRequest, ImagePart
from valora.server.settings import ServerSettings


class ModelNotFoundError(AdapterNotFoundError):
    """The ``model`` of a request is neither the base model nor a registered adapter."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.param = "model"


def adapter_for_model(model: str, base_name: str) -> str | None:
    """``None`` for the base model, else the adapter name the ``model`` field refers to."""
    if model == base_name:
        return None
    prefix = base_name + ":"
    if model.startswith(prefix):
        adapter = model[len(prefix):]
        if not adapter:
            raise ParamError(f"model {model!r} names no adapter after '{prefix}'", param="model")
        return adapter
    return model


def model_not_found(model: str, base_name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model {model!r} does not exist: it is neither the base model "
                              f"{base_name!r} nor a registered adapter (see GET /v1/models)")


def sampling_params(request: ChatCompletionRequest | CompletionRequest, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    """Build validated ``SamplingParams`` (OpenAI defaults: temperature 1, top_p 1)."""
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=request.top_k or 0,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=stop,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        min_tokens=request.min_tokens,
        skip_special_tokens=request.skip_special_tokens,
    )


async def chat_request(request: ChatCompletionRequest, settings: ServerSettings,
                       max_images: int, max_image_bytes: int) -> GenerateRequest:
    """Resolve images and build the engine request of a chat completion."""
    max_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(request, max_tokens, logprobs)
    image_parts = [(i, j, part) for i, message in enumerate(request.messages)
                   if not isinstance(message.content, str)
                   for j, part in enumerate(message.content) if isinstance(part, ImagePart)]
    if len(image_parts) > max_images:
        raise ParamError(f"{len(image_parts)} images in one request; the limit is {max_images}",
                         param="messages")
    for i, _, _ in image_parts:
        if request.messages[i].role != "user":
            raise ParamError(f"messages[{i}]: images are only allowed in user messages",
                             param=f"messages.{i}.content")
    images = [await resolve_image_url(part.image_url.url, settings, max_image_bytes)
              for _, _, part in image_parts]
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            messages.append({"role": role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = [
            {"type": "image"} if isinstance(part, ImagePart)
            else {"type": "text", "text": part.text} for part in message.content]
        messages.append({"role": role, "content": parts})
    return GenerateRequest(messages=messages, images=images,
                           adapter=adapter_for_model(request.model, settings.served_model_name),
                           sampling_params=params, latency_target_s=request.latency_target_s)


def completion_requests(request: CompletionRequest,
                        settings: ServerSettings) -> list[GenerateRequest]:
    """One engine request per prompt of a (possibly batched) text completion."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif not prompt:
        raise ParamError("'prompt' must not be empty", param="prompt")
    elif all(isinstance(item, int) for item in prompt):
        prompts = [[int(t) for t in prompt]]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if request.stream and len(prompts) > 1:
        raise ParamError("streaming supports one prompt per request", param="prompt")
    params = sampling_params(request, request.max_tokens, request.logprobs)
    adapter = adapter_for_model(request.model, settings.served_model_name)
    specs = []
    for item in prompts:
        if isinstance(item, str):
            specs.append(GenerateRequest(prompt=item, adapter=adapter, sampling_params=params,
                                         latency_target_s=request.latency_target_s))
        elif not item:
            raise InvalidRequestError("a token-id prompt must not be empty")
        else:
            specs.append(GenerateRequest(prompt_token_ids=item, adapter=adapter,
                                         sampling_params=params,
                                         latency_target_s=request.latency_target_s))
    return specs
