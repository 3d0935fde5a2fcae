"""Multimodal test fixtures: one tiny LLaVA checkpoint (tokenizer, chat template, processor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from valora.testing.checkpoints import build_tiny_llava


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def tokenizer(llava_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llava_dir))
