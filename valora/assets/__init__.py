"""Files shipped inside the valora package (package data), located without importing heavy code."""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """Directory of the embedded default model (Hugging Face LLaVA format: ``config.json``,
    ``model.safetensors``, tokenizer and processor files). See ``docs/default_model.md``."""
    return _ASSETS / "default_model"
