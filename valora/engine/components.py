"""Build an engine's parts from its config: model, tokenizer, processor, caches, scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from valora.config import EngineConfig
from valora.errors import ModelLoadError
from valora.logger import get_logger

logger = get_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_model_path(model: str) -> Path:
    """``"default"`` → the embedded model (or, where it is not shipped, a tiny random model built on
    first use under ``~/.cache/valora``); anything else must be a local checkpoint directory."""
    if model == "default":
        try:
            from valora.assets import default_model_path

            path = default_model_path()
            if (path / "config.json").exists():
                return path
        except ImportError:
            pass
        return demo_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{model!r} is not a local checkpoint directory with a config.json (valora never downloads weights)"
        )
    return path


def demo_model_path() -> Path:
    """A tiny random LLaVA checkpoint, built once (used only where no default model is shipped)."""
    from valora.testing.checkpoints import build_tiny_llava

    path = Path.home() / ".cache" / "valora" / "demo-tiny-llava"
    if not (path / "config.json").exists():
        logger.info("building a tiny random demo model at %s", path)
        build_tiny_llava(path)
    return path


@dataclass
class KVSizing:
    num_pages: int
    bytes_per_page: int


def size_kv_cache(
    config: EngineConfig, spec: Any, dtype: torch.dtype, device: torch.device
) -> KVSizing:
    """Pages for the KV pool: explicit ``num_pages``, else a byte budget (CPU) or what is left of
    ``memory_fraction`` of the GPU after weights (CUDA)."""
    element = torch.tensor([], dtype=dtype).element_size()
    per_page = (
        2 * spec.num_layers * config.cache.page_size * spec.num_kv_heads * spec.head_dim * element
    )
    if config.cache.num_pages is not None:
        return KVSizing(config.cache.num_pages, per_page)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * config.cache.memory_fraction) - (total - free)
    else:
        budget = config.cache.cpu_cache_bytes
    num_pages = max(budget // per_page, 2)
    return KVSizing(int(num_pages), per_page)


def attention_backend_for(name: str, device: torch.device) -> str:
    """``"auto"`` → the Triton kernels on CUDA (when Triton is installed), PyTorch elsewhere."""
    if name != "auto":
        return name
    from valora.layers.attention import available_attention_backends

    return (
        "triton"
        if device.type == "cuda" and "triton" in available_attention_backends()
        else "torch"
    )
