"""Turn the last-token logits of a step into tokens, per request's ``SamplingParams``.

Batch invariance: a row's result depends only on its own logits and its own random stream
(one ``torch.Generator`` per request, seeded from ``SamplingParams.seed`` when given), never on the
other rows in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from valora.outputs import TokenLogprob
from valora.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One row to sample: its params, its generator and the tokens it may not emit yet."""

    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: tuple[int, ...] = ()


def make_generator(
    params: SamplingParams, device: torch.device, fallback_seed: int
) -> torch.Generator | None:
    """A per-request generator (``None`` for greedy requests, which need no randomness)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else fallback_seed)
    return generator


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and the top-p nucleus of one row."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        remove = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,
    rows: list[SamplingRow],
    before_read: Callable[[], None] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token per row of ``logits`` (``[N, vocab]``, any float dtype).

    Returns the token ids and, for rows that asked for logprobs, the sampled token's logprob
    (from the unmodified distribution, as OpenAI reports) and the top alternatives.

    Greedy rows without banned tokens share one batched ``argmax`` (row-wise, first maximum on
    ties, as the per-row call); every token reaches the host in one device-to-host copy, so a
    step synchronises once however many rows it samples (logprob rows add their own reads).

    ``before_read`` runs on the host after every sampling kernel is launched and before that
    read waits for them: host work placed there overlaps the step's device work (the engine's
    asynchronous output processing).
    """
    logits = logits.float()
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1)
        if any(r.params.logprobs is not None for r in rows)
        else None
    )
    chosen = torch.argmax(logits, dim=-1)
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy and not row.banned_token_ids:
            continue
        row_logits = logits[i]
        if row.banned_token_ids:
            row_logits = row_logits.clone()
            row_logits[list(row.banned_token_ids)] = float("-inf")
        if p.greedy:
            chosen[i] = torch.argmax(row_logits)
        else:
            scaled = _filter_top_k_top_p(row_logits / float(p.temperature), p.top_k, float(p.top_p))
            probs = torch.softmax(scaled, dim=-1)
            # Exponential race == categorical sampling, drawn from this request's own stream.
            noise = torch.empty_like(probs).exponential_(1.0, generator=row.generator)
            chosen[i] = torch.argmax(probs / noise)
    if before_read is not None:
        before_read()
    tokens: list[int] = chosen.tolist()
    logprobs: list[TokenLogprob | None] = []
    for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
        if raw_logprobs is None or row.params.logprobs is None:
            logprobs.append(None)
            continue
        row_lp = raw_logprobs[i]
        top: dict[int, float] = {}
        if row.params.logprobs > 0:
            values, ids = torch.topk(row_lp, row.params.logprobs)
            top = {int(t): float(v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)}
        logprobs.append(TokenLogprob(token_id=token, logprob=float(row_lp[token]), top=top))
    return tokens, logprobs
