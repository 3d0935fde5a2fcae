"""Filling a built model's parameters: from safetensors files, or random ("dummy").

Every parameter is addressed by its *checkpoint* name. A ``FusedLinear`` contributes one name
per slice (``...self_attn.q_proj.weight`` → rows of ``...self_attn.qkv_proj.weight``), so the
loader fuses q/k/v and gate/up rows as it copies. Loading is strict: a tensor with no parameter,
a parameter with no tensor, or a shape mismatch raises ``ModelLoadError`` naming the tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from valora.errors import ModelLoadError
from valora.layers.linear import FusedLinear

# Buffers older transformers versions saved alongside weights; they carry no information.
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: ``parameter[rows]`` (all rows if ``rows`` is None)."""

    parameter: torch.Tensor
    rows: slice | None = None

    def view(self) -> torch.Tensor:
        data = self.parameter.data
        return data if self.rows is None else data[self.rows]


def weight_targets(model: nn.Module) -> dict[str, WeightTarget]:
    """Checkpoint name → target for every parameter of ``model``."""
    targets: dict[str, WeightTarget] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, FusedLinear):
            parent, _, own = path.rpartition(".")
            parent_prefix = f"{parent}." if parent else ""
            for kind, tensor in (("weight", module.weight), ("bias", module.bias)):
                if tensor is None:
                    continue
                if module.slice_names == (own,):
                    targets[f"{prefix}{kind}"] = WeightTarget(tensor)
                    continue
                for index, name in enumerate(module.slice_names):
                    targets[f"{parent_prefix}{name}.{kind}"] = WeightTarget(
                        tensor, module.slice_rows(index))
        else:
            for name, param in module.named_parameters(recurse=False):
                targets[f"{prefix}{name}"] = WeightTarget(param)
    return targets


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"bad {index}: {exc}") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{index.name} names missing shard {file.name}")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {directory} (use load_format='dummy' "
                             "for random weights)")
    return files


def load_safetensors(
    targets: dict[str, WeightTarget],
    files: list[Path],
    normalize: Callable[[str], str | None],
) -> None:
    """Copy every tensor of ``files`` into its target (converting dtype and device)."""
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = normalize(key)
                if name is None or _IGNORED.search(name):
                    continue
                target = targets.get(name)
                if target is None:
                    raise ModelLoadError(f"unexpected tensor {key!r} in {file.name}: the model "
                                         f"has no parameter {name!r}")
                if name in loaded:
                    raise ModelLoadError(f"tensor {key!r} appears twice in the checkpoint")
                dest = target.view()
                shape = tuple(reader.get_slice(key).get_shape())
                if shape != tuple(dest.shape):
                    raise ModelLoadError(f"tensor {key!r} in {file.name} has shape {list(shape)}, "
                                         f"the model expects {list(dest.shape)}")
                dest.copy_(reader.get_tensor(key))
                loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(repr(name) for name in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s): {shown}{more}")


def fill_dummy(targets: dict[str, WeightTarget], seed: int, std: float = 0.02) -> None:
    """Seeded random weights: matrices ~ N(0, std²), norm scales 1, biases 0."""
    generator: torch.Generator | None = None
    for name in sorted(targets):
        dest = targets[name].view()
        if generator is None:
            generator = torch.Generator(device=dest.device).manual_seed(seed)
        if dest.dim() >= 2 or name.endswith("class_embedding"):
            dest.normal_(0.0, std, generator=generator)
        elif name.endswith("bias"):
            dest.zero_()
        else:
            dest.fill_(1.0)
