"""GPU-path tests: Triton kernels run in Triton's CPU interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before any Triton kernel module is imported (``triton.jit``
reads it when it decorates a kernel), so it is set here, at collection time. Tests marked
``gpu`` run only on the GPU machine (``pytest tests/gpu -m gpu``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from valora.testing.checkpoints import TinySpec, build_tiny_llava


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """Tiny CPU ops run far faster on one thread than fighting over a shared machine's cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """No TF32 in cuBLAS or cuDNN (CLIP's patch convolution): fp32 must mean fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA (GQA 4 query / 2 KV heads, head_dim 16, llama3 RoPE)."""
    return build_tiny_llava(tmp_path_factory.mktemp("gpu_tiny_llava"), TinySpec(seed=11))
