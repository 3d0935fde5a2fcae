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

from valora.testing.checkpoints import TinySpec, build_tiny_adapter, build_tiny_llava


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


ADAPTER_RANKS = {"r4": 4, "r8": 8, "r16": 16}


@pytest.fixture(scope="session")
def adapters(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three adapters of ``tiny_llava`` (ranks 4 / 8 / 16, large enough to move its tokens) for
    the engine tests on CUDA."""
    root = tmp_path_factory.mktemp("engine_cuda_adapters")
    return {
        name: build_tiny_adapter(tiny_llava, root / name, rank, alpha=1.5 * rank,
                                 seed=200 + i, std=0.15)
        for i, (name, rank) in enumerate(ADAPTER_RANKS.items())
    }
