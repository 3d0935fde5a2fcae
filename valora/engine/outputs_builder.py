"""Build the caller-facing ``RequestOutput`` of a request from its engine state."""

from __future__ import annotations

from typing import Any

from valora.engine.detokenizer import IncrementalDetokenizer
from valora.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from valora.request import Request


def build_output(
    request: Request,
    detokenizer: IncrementalDetokenizer,
    head_result: dict[str, Any] | None,
    stop_reason: str | int | None,
) -> RequestOutput:
    """Snapshot of ``request``; ``delta_text`` is what streaming clients have not seen yet."""
    finished = request.is_finished
    delta = detokenizer.take_delta() if finished else detokenizer.take_stream_delta()
    logprobs = None
    if request.sampling_params.logprobs is not None:
        k = request.sampling_params.logprobs
        built = request.logprob_outputs  # each token's entry is built once, not every step
        tokens, entries = request.output_token_ids, request.output_logprobs
        for index in range(len(built), min(len(tokens), len(entries))):
            token, entry = tokens[index], entries[index]
            # ``entry`` holds the sampled token and the top-k; the k largest are the top-k.
            top = dict(sorted(entry.items(), key=lambda item: -item[1])[:k])
            built.append(TokenLogprob(token_id=token, logprob=entry[token], top=top))
        logprobs = list(built)
    completion = CompletionOutput(
        text=detokenizer.text,
        token_ids=list(request.output_token_ids),
        finish_reason=request.status.value if finished else None,
        stop_reason=stop_reason,
        delta_text=delta,
        logprobs=logprobs,
        head_result=head_result,
    )
    metrics = RequestMetrics(
        arrival_time=request.arrival_time,
        first_scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        finished_time=request.finished_time,
    )
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=list(request.prompt_token_ids),
        outputs=[completion],
        finished=finished,
        adapter_name=request.adapter_name,
        metrics=metrics,
        num_cached_tokens=request.num_cached_tokens,
        error=request.error,
    )
