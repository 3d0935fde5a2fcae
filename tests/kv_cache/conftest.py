"""Request factory for KV cache tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import count

import pytest

from valora.request import ImageSpan, Request
from valora.sampling_params import SamplingParams

MakeRequest = Callable[..., Request]


@pytest.fixture
def make_request() -> MakeRequest:
    ids = count()

    def make(
        tokens: Sequence[int],
        *,
        adapter: str | None = None,
        images: Sequence[ImageSpan] = (),
        max_tokens: int = 4,
    ) -> Request:
        number = next(ids)
        return Request(
            request_id=f"r{number}",
            prompt_token_ids=list(tokens),
            sampling_params=SamplingParams(max_tokens=max_tokens),
            adapter_name=None if adapter is None else f"name-{adapter}",
            adapter_digest=adapter,
            images=list(images),
            arrival_time=float(number),
        )

    return make
