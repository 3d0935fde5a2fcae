"""The adapters a benchmark serves: given ``name=path`` pairs, or random PEFT adapters of mixed
ranks built once for the served model in a cache directory (keyed by the model's config digest,
so a different model never reuses them)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from valora.engine.components import resolve_model_path
from valora.logger import get_logger
from valora.orchestrator.workload import adapter_names, mixed_ranks
from valora.testing.checkpoints import build_tiny_adapter

logger = get_logger(__name__)

DEFAULT_RANKS = (8, 16, 32, 64)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "valora" / "bench-adapters"


def random_adapters(
    model: str,
    count: int,
    ranks: Sequence[int] = DEFAULT_RANKS,
    cache_dir: str | Path | None = None,
    std: float = 0.1,
) -> dict[str, str]:
    """``{adapter-i: path}`` for ``count`` random adapters of ``model`` with ranks assigned
    round-robin from ``ranks`` and factors ~ N(0, ``std``²); existing complete adapters in the
    cache are reused (a non-default ``std`` is part of the directory name)."""
    base = resolve_model_path(model)
    digest = hashlib.sha256((base / "config.json").read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths: dict[str, str] = {}
    for i, (name, rank) in enumerate(mixed_ranks(adapter_names(count), tuple(ranks)).items()):
        suffix = "" if std == 0.1 else f"-s{std:g}"
        out = root / digest / f"{name}-r{rank}{suffix}"
        if not (out / "adapter_model.safetensors").exists():
            logger.info("building random adapter %s (rank %d) at %s", name, rank, out)
            build_tiny_adapter(base, out, rank, seed=i, std=std)
        paths[name] = str(out)
    return paths


def parse_modules(items: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs as a dict (``ValueError`` naming the bad item otherwise)."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--lora-modules expects NAME=PATH, got {item!r}")
        pairs[name.strip()] = path.strip()
    return pairs
