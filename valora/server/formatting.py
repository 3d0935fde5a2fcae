"""Engine outputs → pieces of OpenAI responses: usage, finish reasons, logprobs in both shapes.

Logprob lists in a ``RequestOutput`` are cumulative; streaming callers pass ``start`` (tokens
already sent) to format only the new ones. Token strings are the tokenizer's decoding of the single
token id.
"""

from __future__ import annotations

from typing import Any

from valora.outputs import RequestOutput, TokenLogprob
from valora.server.response_schemas import (
    ChatLogprobs,
    CompletionLogprobs,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)


def usage_of(outputs: list[RequestOutput]) -> Usage:
    """Token counts summed over ``outputs`` (prompt tokens include expanded image tokens)."""
    prompt = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(output.outputs[0].token_ids) for output in outputs if output.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))


def _entry(tokenizer: Any, token_id: int, logprob: float) -> tuple[str, float, list[int]]:
    text = token_text(tokenizer, token_id)
    return text, _finite(logprob), list(text.encode("utf-8"))


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number.
    return max(float(value), -9999.0)


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None,
                  start: int = 0) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    content = []
    for item in logprobs[start:]:
        text, value, raw = _entry(tokenizer, item.token_id, item.logprob)
        top = []
        for token_id, top_value in sorted(item.top.items(), key=lambda kv: -kv[1]):
            top_text, top_logprob, top_raw = _entry(tokenizer, token_id, top_value)
            top.append(TopLogprob(token=top_text, logprob=top_logprob, bytes=top_raw))
        content.append(TokenLogprobEntry(token=text, logprob=value, bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None, start: int = 0,
                        text_offset: int = 0) -> CompletionLogprobs | None:
    if logprobs is None:
        return None
    result = CompletionLogprobs()
    offset = text_offset
    for item in logprobs[start:]:
        text, value, _ = _entry(tokenizer, item.token_id, item.logprob)
        result.tokens.append(text)
        result.token_logprobs.append(value)
        result.top_logprobs.append({token_text(tokenizer, token_id): _finite(top_value)
                                    for token_id, top_value in item.top.items()})
        result.text_offset.append(offset)
        offset += len(text)
    return result
