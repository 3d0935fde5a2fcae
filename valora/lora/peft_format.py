"""Read and validate a PEFT LoRA adapter directory into a :class:`LoRAAdapter`.

Accepted: ``adapter_config.json`` with ``peft_type == "LORA"`` plus ``adapter_model.safetensors``
(or, failing that, ``adapter_model.bin`` read with ``torch.load(weights_only=True)``), adapting
only the seven language projections of a Llama/LLaVA decoder. Keys may use any of these layouts,
with or without an adapter-name infix (``.lora_A.default.weight``)::

    base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight   (LLaVA, HF 5)
    base_model.model.language_model.model.layers.N.self_attn.q_proj.lora_A.weight   (LLaVA, legacy)
    base_model.model.model.layers.N.mlp.down_proj.lora_B.weight                      (Llama)

Scaling follows PEFT: ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) where ``r`` and
``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern key matches the module
path the way PEFT matches it (``re.match(rf"(.*\\.)?({key})$", path)``, first key wins), else
from ``r`` / ``lora_alpha``. Anything that would change semantics in a way valora does not
implement is rejected with :class:`InvalidAdapterError` naming the problem; nothing is ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from valora.errors import InvalidAdapterError
from valora.lora.adapter import (
    ATTENTION_MODULES,
    LANGUAGE_MODULES,
    LoRAAdapter,
    LoRAModuleWeights,
    ModuleKey,
    canonical_tensor_name,
    compute_digest,
)
from valora.lora.shapes import BaseModelShapes

__all__ = ["BaseModelShapes", "load_peft_adapter"]

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# Config fields whose truthy value means a feature valora does not implement.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias terms (lora_bias=true)",
    "fan_in_fan_out": "fan_in_fan_out=true (transposed Conv1D weights)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (adapted nn.Parameters)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# init_lora_weights values whose adapters expect base weights modified at initialisation.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")
_SEMANTIC_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<kind>lora_A|lora_B)"
                  r"(?:\.(?P<adapter>[\w-]+))?\.weight$")
_LANGUAGE_PATH = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.)"
                            r"layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<module>\w+)$")


def load_peft_adapter(name: str, path: str | Path, base: BaseModelShapes,
                      max_rank: int | None = None) -> LoRAAdapter:
    """Read, validate and decode the PEFT LoRA adapter in directory ``path``.

    ``max_rank``, when given, rejects adapters whose largest rank exceeds it. Raises
    :class:`InvalidAdapterError` (never a bare ``KeyError``/``OSError``) for any bad input.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise InvalidAdapterError(f"adapter {name!r}: directory {directory} does not exist")
    config = _read_config(name, directory)
    tensors = _read_tensors(name, directory)
    pairs = _pair_tensors(name, tensors)
    modules: dict[ModuleKey, LoRAModuleWeights] = {}
    for key, (path_in_model, a, b) in sorted(pairs.items()):
        rank, alpha = _rank_and_alpha(config, path_in_model)
        _check_module(name, key, a, b, rank, base)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[key] = LoRAModuleWeights(a=a.contiguous(), b=b.contiguous(), scale=float(scale))
    largest = max(m.rank for m in modules.values())
    if max_rank is not None and largest > max_rank:
        raise InvalidAdapterError(
            f"adapter {name!r}: rank {largest} exceeds max_lora_rank={max_rank}; "
            f"restart with a larger max_lora_rank or use a smaller adapter")
    digest_tensors = [(canonical_tensor_name(k, "lora_A"), m.a) for k, m in modules.items()]
    digest_tensors += [(canonical_tensor_name(k, "lora_B"), m.b) for k, m in modules.items()]
    digest = compute_digest({f: config.get(f) for f in _SEMANTIC_FIELDS}, digest_tensors)
    return LoRAAdapter(name=name, path=directory.resolve(), digest=digest, modules=modules)


def _read_config(name: str, directory: Path) -> dict[str, object]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapterError(f"adapter {name!r}: {CONFIG_FILE} missing in {directory}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapterError(f"adapter {name!r}: {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(
            f"adapter {name!r}: peft_type is {config.get('peft_type')!r}; only LORA is supported")
    for field_name, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field_name):
            raise InvalidAdapterError(f"adapter {name!r}: {feature} is not supported")
    if config.get("bias", "none") != "none":
        raise InvalidAdapterError(
            f"adapter {name!r}: bias={config.get('bias')!r} is not supported (only 'none')")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise InvalidAdapterError(
            f"adapter {name!r}: init_lora_weights={init!r} expects modified base weights; "
            f"convert it to a plain LoRA with PEFT before serving")
    _check_target_list(name, config.get("target_modules"))
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidAdapterError(f"adapter {name!r}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise InvalidAdapterError(f"adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    _check_patterns(name, config)
    return config


def _check_patterns(name: str, config: Mapping[str, object]) -> None:
    """rank_pattern values are positive ints, alpha_pattern values numbers, keys valid regexes."""
    for pattern_field, want_rank in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(pattern_field) or {}
        if not isinstance(patterns, dict):
            raise InvalidAdapterError(f"adapter {name!r}: {pattern_field} must be an object")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise InvalidAdapterError(f"adapter {name!r}: {pattern_field} key {key!r} is not "
                                          f"a valid regular expression: {exc}") from exc
            valid = (isinstance(value, int) and value > 0) if want_rank else \
                isinstance(value, int | float)
            if isinstance(value, bool) or not valid:
                raise InvalidAdapterError(f"adapter {name!r}: {pattern_field}[{key!r}] = "
                                          f"{value!r} is not a valid {pattern_field[:-8]}")


def _check_target_list(name: str, targets: object) -> None:
    """Reject explicit non-language targets early (regex targets are checked via the weights)."""
    if not isinstance(targets, list):
        return
    for target in targets:
        leaf = str(target).rsplit(".", 1)[-1]
        if leaf not in LANGUAGE_MODULES:
            raise InvalidAdapterError(f"adapter {name!r}: target_modules entry {target!r} "
                                      f"{_describe_target(str(target))}")


def _describe_target(path: str) -> str:
    if "vision_tower" in path or "vision_model" in path:
        return "is in the vision tower, which valora does not adapt"
    if "embed_tokens" in path or "wte" in path:
        return "is the token embedding, which valora does not adapt"
    if "lm_head" in path:
        return "is the LM head, which valora does not adapt"
    if "multi_modal_projector" in path:
        return "is the multimodal projector, which valora does not adapt"
    return f"is outside the supported language projections {list(LANGUAGE_MODULES)}"


def _read_tensors(name: str, directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = directory / SAFETENSORS_FILE, directory / BIN_FILE
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load

            # Decoded from bytes read once, not memory-mapped: the tensors must not change if the
            # file is rewritten in place while the adapter is registered (its digest is of these).
            tensors: object = load(safetensors_path.read_bytes())
        elif bin_path.is_file():
            tensors = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        else:
            raise InvalidAdapterError(f"adapter {name!r}: no weights file ({SAFETENSORS_FILE} "
                                      f"or {BIN_FILE}) in {directory}")
    except InvalidAdapterError:
        raise
    except Exception as exc:  # any decoder failure means unreadable weights
        raise InvalidAdapterError(f"adapter {name!r}: cannot read weights: {exc}") from exc
    if not isinstance(tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in tensors.values()):
        raise InvalidAdapterError(
            f"adapter {name!r}: weights file must hold a flat dict of tensors")
    if not tensors:
        raise InvalidAdapterError(f"adapter {name!r}: weights file holds no tensors")
    return {str(k): v for k, v in tensors.items()}


def _pair_tensors(name: str, tensors: Mapping[str, torch.Tensor]
                  ) -> dict[ModuleKey, tuple[str, torch.Tensor, torch.Tensor]]:
    """Group tensors into ``{(layer, module): (module path, A, B)}``; reject anything else."""
    paths: dict[ModuleKey, str] = {}
    halves: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    adapter_infixes: set[str | None] = set()
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise InvalidAdapterError(f"adapter {name!r}: {_describe_stray_key(key)}")
        module_path, kind = match["path"], match["kind"]
        adapter_infixes.add(match["adapter"])
        language = _LANGUAGE_PATH.match(module_path)
        if language is None or language["module"] not in LANGUAGE_MODULES:
            raise InvalidAdapterError(
                f"adapter {name!r}: tensor {key!r} {_describe_target(module_path)}")
        module_key = (int(language["layer"]), language["module"])
        expected_parent = "self_attn" if module_key[1] in ATTENTION_MODULES else "mlp"
        if language["parent"] != expected_parent:
            raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r}: {module_key[1]} is not "
                                      f"under {expected_parent}")
        entry = halves.setdefault(module_key, {})
        if kind in entry or paths.setdefault(module_key, module_path) != module_path:
            raise InvalidAdapterError(f"adapter {name!r}: more than one {kind} tensor for layer "
                                      f"{module_key[0]} {module_key[1]}")
        if not torch.is_floating_point(tensor):
            raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r} has dtype {tensor.dtype}, "
                                      f"expected a floating-point dtype")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidAdapterError(f"adapter {name!r}: tensor {key!r} contains NaN or Inf")
        entry[kind] = tensor
    if len(adapter_infixes) > 1:
        raise InvalidAdapterError(f"adapter {name!r}: weights mix several PEFT adapter names "
                                  f"{sorted(str(i) for i in adapter_infixes)}")
    pairs = {}
    for module_key, entry in halves.items():
        missing = {"lora_A", "lora_B"} - entry.keys()
        if missing:
            layer, module = module_key
            raise InvalidAdapterError(f"adapter {name!r}: layer {layer} {module} has "
                                      f"{next(iter(entry))} but no {missing.pop()}")
        pairs[module_key] = (paths[module_key], entry["lora_A"], entry["lora_B"])
    return pairs


def _describe_stray_key(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"tensor {key!r} is a DoRA magnitude vector; DoRA is not supported"
    if "lora_embedding_" in key:
        return f"tensor {key!r} adapts an embedding, which valora does not adapt"
    if re.search(r"\.lora_B(\.[\w-]+)?\.bias$", key):
        return f"tensor {key!r} is a LoRA bias; lora_bias is not supported"
    return f"unexpected tensor {key!r} (only lora_A/lora_B weights of language projections)"


def _pattern_value(patterns: Mapping[str, object], module_path: str) -> object | None:
    """PEFT's ``get_pattern_key``: the first key that matches a dotted suffix of the path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return patterns[key]
    return None


def _rank_and_alpha(config: Mapping[str, object], module_path: str) -> tuple[int, float]:
    rank_patterns = config.get("rank_pattern") or {}
    alpha_patterns = config.get("alpha_pattern") or {}
    assert isinstance(rank_patterns, dict) and isinstance(alpha_patterns, dict)  # checked on read
    rank = _pattern_value(rank_patterns, module_path)
    alpha = _pattern_value(alpha_patterns, module_path)
    rank = config["r"] if rank is None else rank
    alpha = config["lora_alpha"] if alpha is None else alpha
    assert isinstance(rank, int) and isinstance(alpha, int | float)
    return rank, float(alpha)


def _check_module(name: str, key: ModuleKey, a: torch.Tensor, b: torch.Tensor, rank: int,
                  base: BaseModelShapes) -> None:
    layer, module = key
    where = f"adapter {name!r}: layer {layer} {module}"
    if layer >= base.num_layers:
        raise InvalidAdapterError(f"{where}: layer index {layer} but the base model has "
                                  f"{base.num_layers} layers (adapter built for another base "
                                  f"model)")
    in_features, out_features = base.module_shape(module)
    if a.dim() != 2 or b.dim() != 2:
        raise InvalidAdapterError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                  f"must both be 2-D")
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise InvalidAdapterError(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
            f"model's {module} ({in_features} -> {out_features}); adapter built for another "
            f"base model")
    if a.shape[0] != b.shape[1]:
        raise InvalidAdapterError(f"{where}: lora_A has {a.shape[0]} rows but lora_B has "
                                  f"{b.shape[1]} columns")
    if a.shape[0] != rank:
        raise InvalidAdapterError(f"{where}: weights have rank {a.shape[0]} but adapter_config "
                                  f"(r / rank_pattern) says {rank}")
