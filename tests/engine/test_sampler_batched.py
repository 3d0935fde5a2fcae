"""``sample``: the batched greedy path equals a per-row argmax, and each row's result depends
only on its own logits and stream (banned tokens, temperature rows, logprobs mixed in)."""

from __future__ import annotations

import torch

from valora.engine.sampler import SamplingRow, make_generator, sample
from valora.sampling_params import SamplingParams


def rows_for(params: list[SamplingParams], banned: list[tuple[int, ...]]) -> list[SamplingRow]:
    return [SamplingRow(p, make_generator(p, torch.device("cpu"), 11 + i), b)
            for i, (p, b) in enumerate(zip(params, banned, strict=True))]


def test_greedy_rows_match_a_per_row_argmax_including_ties() -> None:
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    logits[3, [4, 9]] = 10.0  # a tie: the first maximum wins, as torch.argmax documents
    greedy = SamplingParams(temperature=0.0)
    tokens, logprobs = sample(logits, rows_for([greedy] * 7, [()] * 7))
    assert tokens == [int(torch.argmax(row)) for row in logits]
    assert tokens[3] == 4 and logprobs == [None] * 7


def test_mixed_rows_are_independent_of_their_neighbours() -> None:
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=5)
    top = int(torch.argmax(logits[1]))
    params = [greedy, greedy, hot, SamplingParams(temperature=0.0, logprobs=3), hot]
    banned: list[tuple[int, ...]] = [(), (top,), (), (), ()]
    tokens, logprobs = sample(logits, rows_for(params, banned))
    for i in range(5):  # each row alone gives the same token (same seed, same logits)
        alone, alone_lp = sample(logits[i:i + 1], rows_for([params[i]], [banned[i]]))
        assert alone == [tokens[i]]
        assert (alone_lp[0] is None) == (logprobs[i] is None)
    assert tokens[1] != top and tokens[1] == int(torch.topk(logits[1], 2).indices[1])
    entry = logprobs[3]
    assert entry is not None and entry.token_id == tokens[3] and len(entry.top) == 3
    want = float(torch.log_softmax(logits[3], -1)[tokens[3]])
    assert abs(entry.logprob - want) < 1e-6
