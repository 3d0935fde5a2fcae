"""Head tests run their tiny tensor ops on one thread: on a shared 2-core machine a second
OpenMP thread makes such ops tens of times slower (threads spin while waiting for a core)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
