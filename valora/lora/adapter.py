"""A decoded LoRA adapter: immutable weights per (layer, module) plus a content digest.

An adapter is identified by its *digest*, not by its name or path: two directories holding the
same tensors and the same semantics-changing config fields have the same digest, and changing a
single byte of any tensor changes it. Prefix-cache keys and request records use the digest.

Weights follow PEFT's layout: for a linear ``y = x @ W.T`` with ``W: [out, in]``, LoRA adds
``scale * (x @ a.T) @ b.T`` with ``a: [r, in]`` and ``b: [out, r]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LANGUAGE_MODULES = ATTENTION_MODULES + MLP_MODULES
"""The seven language-model projections an adapter may target (PEFT module names)."""

ModuleKey = tuple[int, str]
"""``(layer index, PEFT module name)``, e.g. ``(3, "q_proj")``."""


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One adapted linear: ``a: [r, in]``, ``b: [out, r]``, ``scale`` = effective PEFT scaling.

    Invariant: ``a.shape[0] == b.shape[1] == rank > 0``. Tensors are CPU, contiguous, never
    written after construction.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.a.nbytes + self.b.nbytes)

    def delta_weight(self) -> torch.Tensor:
        """``scale * b @ a`` in float32: the ``[out, in]`` update this module adds to ``W``."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass(frozen=True)
class LoRAAdapter:
    """A validated adapter, ready to be written into slots or merged into base weights.

    ``rank`` is the largest module rank; ``target_modules`` the sorted distinct module names
    adapted in at least one layer; ``modules`` a read-only mapping.
    """

    name: str
    path: Path
    digest: str
    modules: Mapping[ModuleKey, LoRAModuleWeights]
    rank: int = field(init=False)
    nbytes: int = field(init=False)
    target_modules: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError(f"adapter {self.name!r} has no modules")
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        object.__setattr__(self, "rank", max(m.rank for m in self.modules.values()))
        object.__setattr__(self, "nbytes", sum(m.nbytes for m in self.modules.values()))
        names = {module for _, module in self.modules}
        object.__setattr__(self, "target_modules",
                           tuple(m for m in LANGUAGE_MODULES if m in names))

    @property
    def layers(self) -> tuple[int, ...]:
        """Sorted layer indices with at least one adapted module."""
        return tuple(sorted({layer for layer, _ in self.modules}))


def canonical_tensor_name(key: ModuleKey, which: str) -> str:
    """Layout-independent tensor name used in digests: ``layers.3.q_proj.lora_A``."""
    layer, module = key
    return f"layers.{layer}.{module}.{which}"


def compute_digest(config_fields: Mapping[str, object],
                   tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over canonical JSON of ``config_fields`` then, sorted by name, each tensor's name,
    dtype, shape and raw bytes. Names should be canonical so that key layout and PEFT adapter-name
    infixes (which do not change semantics) do not change the digest."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(config_fields), sort_keys=True, separators=(",", ":")).encode())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach().to("cpu").contiguous()
        header = f"\n{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|"
        h.update(header.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
