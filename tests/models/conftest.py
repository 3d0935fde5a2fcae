"""Session fixtures for the model tests: tiny checkpoints (built once each) and prompt helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from valora.testing.checkpoints import TinySpec, build_tiny_llama, build_tiny_llava

# Name -> (builder, spec). Seeds differ so that the variants are different random models.
VARIANTS: dict[str, tuple[Callable[..., Path], TinySpec]] = {
    "default": (build_tiny_llava, TinySpec()),
    "rope_linear": (build_tiny_llava, TinySpec(rope_type="linear", seed=1)),
    # max_position_embeddings below the prompt length, so dynamic NTK scaling really kicks in.
    "rope_dynamic": (build_tiny_llava, TinySpec(rope_type="dynamic", max_position_embeddings=48,
                                                seed=2)),
    "rope_default_tied": (build_tiny_llava, TinySpec(rope_type="default", tie_word_embeddings=True,
                                                     seed=3)),
    "select_full": (build_tiny_llava, TinySpec(vision_feature_select_strategy="full", seed=4)),
    # Several feature layers: their hidden states are concatenated before the projector.
    "feature_layers": (build_tiny_llava, TinySpec(vision_feature_layer=[-2, 0],  # type: ignore[arg-type]
                                                  seed=6)),
    "llama": (build_tiny_llama, TinySpec(seed=5)),
}

CheckpointFactory = Callable[[str], Path]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """``checkpoint(name)`` → directory of the tiny checkpoint ``VARIANTS[name]`` (built lazily)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            builder, spec = VARIANTS[name]
            built[name] = builder(tmp_path_factory.mktemp(f"ckpt_{name}"), spec)
        return built[name]

    return get
