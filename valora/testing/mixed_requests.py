"""A mixed batch of requests for checking an engine order against the synchronous one (greedy
and seeded sampling, adapters, an image, stop strings hit mid-output and on the last allowed
token, stop token ids, ``min_tokens``, logprobs), and how to compare their outputs: shared by
the asynchronous output processing and asynchronous scheduling tests."""

from __future__ import annotations

from typing import Any

from PIL import Image

from valora import SamplingParams
from valora.engine.llm import LLM
from valora.outputs import RequestOutput

PROMPTS = ["USER: tell me a story ASSISTANT:", "USER: stop ASSISTANT:", "USER: list ASSISTANT:"]


def summary(out: RequestOutput) -> tuple[Any, ...]:
    """Everything but the logprob values, which move in the last float digits with the batch
    around a row (a stop-string request runs one step longer here): ``logprob_values``."""
    c = out.outputs[0]
    logprobs = None if c.logprobs is None else [(lp.token_id, sorted(lp.top))
                                                for lp in c.logprobs]
    return c.token_ids, c.text, c.finish_reason, c.stop_reason, logprobs, out.finished


def logprob_values(out: RequestOutput) -> list[float]:
    return [lp.logprob for lp in out.outputs[0].logprobs or []]


def needle(text: str) -> str | None:
    """A short piece from the middle of ``text`` that starts at its first occurrence."""
    for start in range(len(text) // 3, len(text) - 2):
        piece = text[start:start + 2]
        if piece.strip() and text.index(piece) == start:
            return piece
    return None


def tail_needle(text: str) -> str | None:
    """The shortest non-blank ending of ``text`` found nowhere earlier in it."""
    for size in range(1, min(len(text), 8) + 1):
        piece = text[-size:]
        if piece.strip() and text.index(piece) == len(text) - size:
            return piece
    return None


def mixed_requests(sync: LLM, images: list[Image.Image]) -> list[dict[str, Any]]:
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    full = sync.generate([{"prompt": p, "sampling_params": greedy} for p in PROMPTS])
    texts = [o.outputs[0].text for o in full]
    reqs: list[dict[str, Any]] = [
        {"prompt": PROMPTS[0], "sampling_params": greedy},
        {"prompt": PROMPTS[1], "sampling_params": SamplingParams(
            max_tokens=12, temperature=0.9, seed=7, ignore_eos=True, logprobs=2)},
        {"prompt": PROMPTS[2], "adapter": "r4", "sampling_params": SamplingParams(
            max_tokens=9, temperature=0.0, min_tokens=3)},
        {"prompt": PROMPTS[1], "sampling_params": SamplingParams(
            max_tokens=10, temperature=0.0, ignore_eos=True,
            stop_token_ids=(full[1].outputs[0].token_ids[4],))},
        {"prompt": "USER: <image>\nwhat is it? ASSISTANT:", "images": [images[0]],
         "adapter": "r16", "sampling_params": SamplingParams(max_tokens=7, temperature=0.0,
                                                             ignore_eos=True)},
    ]
    for prompt, text in zip(PROMPTS, texts, strict=True):
        middle, tail = needle(text), tail_needle(text)
        if middle is not None:  # a stop string hit mid-output: one more step runs, discarded
            reqs.append({"prompt": prompt, "sampling_params": SamplingParams(
                max_tokens=10, temperature=0.0, ignore_eos=True, stop=(middle,))})
        if tail is not None:  # hit on the 10th token, which also ends the request by length
            reqs.append({"prompt": prompt, "sampling_params": SamplingParams(
                max_tokens=10, temperature=0.0, ignore_eos=True, stop=(tail,))})
    return reqs
