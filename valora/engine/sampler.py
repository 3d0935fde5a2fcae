"""Turn the last-token logits of a step into tokens, per request's ``SamplingParams``.

Batch invariance: a row's result depends only on its own logits and its own random stream
(one ``torch.Generator`` per request, seeded from ``SamplingParams.seed`` when given), never on the
other rows in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from valora.engine.host_memory import Staging, byte_view, packed_offsets, staging_pool
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


class SampledTokens:
    """The tokens of one step's sampling, launched and not yet read (``launch_sample``).

    ``chosen`` is the ``[N]`` int64 device tensor of the sampled ids in row order: a step
    launched before this one is read can take its input ids from it (asynchronous scheduling).
    Every value the host needs — the ids and, for rows that asked for logprobs, the sampled
    token's logprob and the top alternatives — is computed on the device at launch; on CUDA it is
    copied without blocking into a page-locked staging buffer (``valora.engine.host_memory``)
    whose event marks the copies, so ``read`` waits for this step's work only, never for work
    launched after it; ``read`` gives the buffer back (its result is kept for a second call)."""

    def __init__(self, chosen: torch.Tensor, rows: list[SamplingRow],
                 raw_logprobs: torch.Tensor | None) -> None:
        self.chosen = chosen
        self._rows = rows
        pieces: list[torch.Tensor] = [chosen]
        self._logprob_rows: list[int] = []
        if raw_logprobs is not None:
            for i, row in enumerate(rows):
                k = row.params.logprobs
                if k is None:
                    continue
                self._logprob_rows.append(i)
                pieces.append(raw_logprobs[i].gather(0, chosen[i:i + 1]))
                if k > 0:
                    values, ids = torch.topk(raw_logprobs[i], k)
                    pieces += [values, ids]
        self._staging: Staging | None = None
        self._result: tuple[list[int], list[TokenLogprob | None]] | None = None
        if chosen.is_cuda:
            offsets, total = packed_offsets([p.numel() * p.element_size() for p in pieces])
            self._staging = staging_pool(chosen.device).lease(total)
            pieces = [byte_view(self._staging.buffer, offset, p).copy_(p, non_blocking=True)
                      for p, offset in zip(pieces, offsets, strict=True)]
            self._staging.mark_queued()
        self._host = pieces

    def read(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Wait for this step's sampling (not for later work) and return the token ids and, per
        row, the sampled token's logprob record or None."""
        if self._result is None:
            try:
                if self._staging is not None:
                    self._staging.synchronize()
                self._result = self._values()
            finally:
                if self._staging is not None:
                    self._staging.release()
        return self._result

    def _values(self) -> tuple[list[int], list[TokenLogprob | None]]:
        host = iter(self._host)
        tokens: list[int] = next(host).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        for i in self._logprob_rows:
            token = tokens[i]
            logprob = float(next(host)[0])
            top: dict[int, float] = {}
            if (self._rows[i].params.logprobs or 0) > 0:
                values, ids = next(host), next(host)
                top = {int(t): float(v)
                       for t, v in zip(ids.tolist(), values.tolist(), strict=True)}
            logprobs[i] = TokenLogprob(token_id=token, logprob=logprob, top=top)
        return tokens, logprobs


def launch_sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampledTokens:
    """Launch the sampling of one token per row of ``logits`` (``[N, vocab]``, any float dtype);
    ``SampledTokens.read`` returns them (``sample`` says what is sampled)."""
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
    return SampledTokens(chosen, rows, raw_logprobs)


def sample(logits: torch.Tensor, rows: list[SamplingRow]
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token per row of ``logits`` (``[N, vocab]``, any float dtype) and read it back.

    Returns the token ids and, for rows that asked for logprobs, the sampled token's logprob
    (from the unmodified distribution, as OpenAI reports) and the top alternatives.

    Greedy rows without banned tokens share one batched ``argmax`` (row-wise, first maximum on
    ties, as the per-row call); every value reaches the host after one wait for the step
    (``SampledTokens``), however many rows it samples. The engine launches and reads in two
    halves (``launch_sample``, ``SampledTokens.read``) so host work can run in between.
    """
    return launch_sample(logits, rows).read()
