"""``POST /v1/chat/completions``: text and image chat, one choice, optional SSE streaming.

Admission errors (bad parameters, images, unknown model, full queue) are HTTP errors before any
byte of the response; once a stream has started, a failure is sent as one ``data: {"error": ...}``
event followed by ``data: [DONE]``. A task-head adapter's label is the message content and its
structured result is ``choices[0].message.valora_head_result`` (``delta.valora_head_result`` in the
final streamed chunk).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from valora.server.context import Generation, ServerContext, unless_disconnected
from valora.server.errors import error_for
from valora.server.formatting import chat_logprobs, usage_of
from valora.server.response_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    DeltaMessage,
)
from valora.server.schemas import ChatCompletionRequest, check_supported
from valora.server.translate import chat_request


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event carrying a JSON object (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def register_chat_route(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        check_supported(body)
        image = ctx.engine.config.image
        spec = await chat_request(body, ctx.settings, image.max_images_per_request,
                                  image.max_image_bytes)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        spec = replace(spec, request_id=response_id)
        poll_s = ctx.settings.disconnect_poll_s
        generation = await unless_disconnected(request, ctx.start(spec, body.model), poll_s)
        if body.stream:
            return StreamingResponse(_chat_events(ctx, generation, body, response_id),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(generation.close))
        try:
            final = await unless_disconnected(request, generation.final(), poll_s)
        finally:
            generation.close()
        completion = final.outputs[0]
        logprobs = None
        if body.logprobs:
            logprobs = chat_logprobs(ctx.engine.tokenizer, completion.logprobs)
        message = ChatMessageOut(content=completion.text, valora_head_result=completion.head_result)
        response = ChatCompletionResponse(
            id=response_id, model=body.model, usage=usage_of([final]),
            choices=[ChatChoice(index=0, finish_reason=completion.finish_reason, message=message,
                                logprobs=logprobs)])
        return JSONResponse(response.model_dump())


async def _chat_events(ctx: ServerContext, generation: Generation, body: ChatCompletionRequest,
                       response_id: str) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: DeltaMessage, **fields: Any) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, **fields)
        return sse(ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                       choices=[choice]).model_dump())

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    num_logprobs_sent = 0
    try:
        yield chunk(DeltaMessage(role="assistant", content=""))
        async for output in generation.outputs():
            completion = output.outputs[0]
            logprobs = None
            if body.logprobs:
                logprobs = chat_logprobs(ctx.engine.tokenizer, completion.logprobs,
                                         num_logprobs_sent)
                num_logprobs_sent = len(completion.logprobs or [])
            if output.finished:
                yield chunk(DeltaMessage(content=completion.delta_text,
                                         valora_head_result=completion.head_result),
                            logprobs=logprobs, finish_reason=completion.finish_reason)
                if include_usage:
                    usage = ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                                choices=[], usage=usage_of([output]))
                    yield sse(usage.model_dump())
            elif completion.delta_text or (logprobs is not None and logprobs.content):
                yield chunk(DeltaMessage(content=completion.delta_text), logprobs=logprobs)
    except Exception as exc:  # the response has started: report the error in the stream
        yield sse(error_for(exc)[1])
    finally:
        generation.close()
    yield sse("[DONE]")
