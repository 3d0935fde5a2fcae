"""Shared fixtures for engine-level tests: one tiny LLaVA checkpoint and a few PEFT adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from valora.testing.checkpoints import LANGUAGE_MODULES, build_tiny_adapter, build_tiny_llava

ADAPTER_RANKS = {"r4": 4, "r8": 8, "r16": 16, "r64": 64}


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llava: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four adapters of ranks 4/8/16/64; r8 targets attention only and uses rsLoRA."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, rank) in enumerate(ADAPTER_RANKS.items()):
        targets = ("q_proj", "k_proj", "v_proj", "o_proj") if name == "r8" else LANGUAGE_MODULES
        out[name] = build_tiny_adapter(
            tiny_llava,
            root / name,
            rank,
            alpha=rank * 1.5,
            targets=targets,
            use_rslora=name == "r8",
            seed=100 + i,
            std=0.15,
        )
    return out


def make_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [make_image(1), make_image(2, (30, 60)), make_image(3, (64, 64))]
