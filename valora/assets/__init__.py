"""Files shipped inside the valora package (package data), located without importing heavy code."""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent
ADAPTER_CONFIG_FILE = "adapter_config.json"


def default_model_path() -> Path:
    """Directory of the embedded default model (Hugging Face LLaVA format: ``config.json``,
    ``model.safetensors``, tokenizer and processor files). See ``docs/default_model.md``."""
    return _ASSETS / "default_model"


def default_adapters_dir() -> Path:
    """Directory of the adapters bundled with the embedded default model (may be absent)."""
    return _ASSETS / "adapters"


def default_adapter_paths(adapters_dir: Path | None = None) -> dict[str, Path]:
    """``name -> directory`` of every bundled adapter, sorted by name.

    A bundled adapter is a subdirectory of ``adapters_dir`` (default: ``default_adapters_dir()``)
    holding ``adapter_config.json``; its name is the subdirectory's name. Other entries are
    skipped, and a missing directory means no bundled adapters (an empty dict). Nothing is
    validated here: registering the adapter does that.
    """
    root = default_adapters_dir() if adapters_dir is None else Path(adapters_dir)
    if not root.is_dir():
        return {}
    found = (child for child in root.iterdir()
             if child.is_dir() and (child / ADAPTER_CONFIG_FILE).is_file())
    return {child.name: child for child in sorted(found, key=lambda child: child.name)}
