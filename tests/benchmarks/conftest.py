"""A tiny LLaVA and two small adapters, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from valora.testing.checkpoints import TinySpec, build_tiny_adapter, build_tiny_llava


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("bench-model"), TinySpec(num_layers=1))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bench-adapters")
    return {f"a{rank}": str(build_tiny_adapter(tiny_model, root / f"a{rank}", rank, seed=rank))
            for rank in (8, 16)}
