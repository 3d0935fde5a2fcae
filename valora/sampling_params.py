"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from valora.errors import InvalidSamplingParamsError


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into tokens for one request.

    ``temperature == 0`` means greedy decoding. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes sampling reproducible per request, independent of batch composition.
    ``stop`` strings end generation when they appear in the decoded output (they are not included
    in the returned text); ``stop_token_ids`` end it when sampled (not included either).
    ``logprobs`` is the number of top alternatives to return per generated token (``None`` = off;
    the sampled token's own logprob is always included when it is not ``None``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems: list[str] = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            problems.append(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must be a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be non-negative token ids")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20
        ):
            problems.append(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if problems:
            raise InvalidSamplingParamsError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0
