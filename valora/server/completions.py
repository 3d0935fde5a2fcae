"""``POST /v1/completions``: text prompts (strings or token ids), one choice per prompt.

Several prompts in one request are admitted together (if one is refused, the others are aborted
and the request fails with that error) and run concurrently; choice ``i`` answers prompt ``i``.
Streaming takes one prompt. Task-head results appear as ``choices[i].valora_head_result``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from valora.outputs import RequestOutput
from valora.server.chat import sse
from valora.server.context import Generation, ServerContext, unless_disconnected
from valora.server.errors import error_for
from valora.server.formatting import completion_logprobs, usage_of
from valora.server.response_schemas import CompletionChoice, CompletionResponse
from valora.server.schemas import CompletionRequest, check_supported
from valora.server.translate import completion_requests


def register_completion_route(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        check_supported(body)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        specs = [replace(spec, request_id=f"{response_id}-{i}")
                 for i, spec in enumerate(completion_requests(body, ctx.settings))]
        poll_s = ctx.settings.disconnect_poll_s
        generations: list[Generation] = []
        try:
            for spec in specs:
                started = await unless_disconnected(request, ctx.start(spec, body.model), poll_s)
                generations.append(started)
        except BaseException:
            for generation in generations:
                generation.close()
            raise
        if body.stream:
            generation = generations[0]
            return StreamingResponse(_completion_events(ctx, generation, body, response_id),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(generation.close))
        try:
            finals = await unless_disconnected(
                request, asyncio.gather(*(g.final() for g in generations)), poll_s)
        finally:
            for generation in generations:
                generation.close()
        choices = [_choice(ctx, body, i, final) for i, final in enumerate(finals)]
        response = CompletionResponse(id=response_id, model=body.model, choices=choices,
                                      usage=usage_of(list(finals)))
        return JSONResponse(response.model_dump())


def _choice(ctx: ServerContext, body: CompletionRequest, index: int,
            final: RequestOutput) -> CompletionChoice:
    completion = final.outputs[0]
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(ctx.engine.tokenizer, completion.logprobs)
    return CompletionChoice(index=index, text=completion.text, logprobs=logprobs,
                            finish_reason=completion.finish_reason,
                            valora_head_result=completion.head_result)


async def _completion_events(ctx: ServerContext, generation: Generation, body: CompletionRequest,
                             response_id: str) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    num_logprobs_sent = 0
    text_offset = 0
    try:
        async for output in generation.outputs():
            completion = output.outputs[0]
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(ctx.engine.tokenizer, completion.logprobs,
                                               num_logprobs_sent, text_offset)
                num_logprobs_sent = len(completion.logprobs or [])
                text_offset += sum(len(token) for token in logprobs.tokens) if logprobs else 0
            has_logprobs = logprobs is not None and bool(logprobs.tokens)
            if not (output.finished or completion.delta_text or has_logprobs):
                continue
            choice = CompletionChoice(
                index=0, text=completion.delta_text, logprobs=logprobs,
                finish_reason=completion.finish_reason if output.finished else None,
                valora_head_result=completion.head_result if output.finished else None)
            yield sse(CompletionResponse(id=response_id, created=created, model=body.model,
                                         choices=[choice]).model_dump())
            if output.finished and include_usage:
                usage = CompletionResponse(id=response_id, created=created, model=body.model,
                                           choices=[], usage=usage_of([output]))
                yield sse(usage.model_dump())
    except Exception as exc:  # the response has started: report the error in the stream
        yield sse(error_for(exc)[1])
    finally:
        generation.close()
    yield sse("[DONE]")
