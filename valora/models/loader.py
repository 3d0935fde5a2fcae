"""``load_model``: checkpoint directory → ready-to-run valora model.

Steps: parse the configs, pick the class from the registry, build it on the ``meta`` device
(no memory), allocate every parameter once in the requested dtype on the requested device, then
fill them from safetensors (single file or index-sharded; legacy and current key layouts) or
with seeded random values (``load_format="dummy"``, no weight files read).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from valora.errors import ModelLoadError
from valora.layers.attention import create_attention_backend
from valora.logger import get_logger
from valora.models.base import CausalLMBase
from valora.models.config import load_checkpoint_config
from valora.models.registry import resolve_architecture
from valora.models.weights import checkpoint_files, fill_dummy, load_safetensors, weight_targets

logger = get_logger(__name__)

LOAD_FORMATS = ("safetensors", "dummy")


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every meta parameter by uninitialised storage (float ones in ``dtype``)."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                kind = dtype if param.is_floating_point() else param.dtype
                replaced[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=kind, device=device), requires_grad=False)
            module._parameters[name] = replaced[id(param)]
    leftover = [name for name, buf in model.named_buffers() if buf.is_meta]
    if leftover:
        raise ModelLoadError(f"model has meta buffers the loader cannot fill: {leftover}")


def load_model(
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "safetensors",
    seed: int = 0,
    attention_backend: str = "torch",
) -> CausalLMBase:
    """Load the checkpoint at ``path`` (see module docstring); ``ModelLoadError`` on failure."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    directory = Path(path)
    config = load_checkpoint_config(directory)
    builder = resolve_architecture(config)
    backend = create_attention_backend(attention_backend)
    with torch.device("meta"):
        model = builder(config, backend)
    _materialize(model, dtype, torch.device(device))
    targets = weight_targets(model)
    if load_format == "dummy":
        fill_dummy(targets, seed)
    else:
        load_safetensors(targets, checkpoint_files(directory), model.normalize_checkpoint_key)
    model.eval()
    logger.info("loaded %s from %s (%s, %s, %s weights, attention=%s)", config.architecture,
                directory, dtype, device, load_format, attention_backend)
    return model
