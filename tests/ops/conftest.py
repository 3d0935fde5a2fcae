"""Op tests: run the Triton kernels in Triton's CPU interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before ``valora.ops.lora_kernels`` is imported (``triton.jit``
reads it when it decorates a kernel), so it is set here, at collection time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """Tiny CPU ops run far faster on one thread than fighting over a shared machine's cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
