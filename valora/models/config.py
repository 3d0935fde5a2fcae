"""A checkpoint's ``config.json`` (+ ``generation_config.json``) as frozen dataclasses.

Keys a config omits take the defaults Hugging Face's config classes use (``LlamaConfig``,
``CLIPVisionConfig`` and LLaVA's vision defaults), so partial configs such as
``llava-hf/llava-1.5-7b-hf``'s parse to the same shapes transformers builds. Both RoPE layouts are
read: transformers 5 ``rope_parameters`` and the legacy ``rope_theta`` + ``rope_scaling``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valora.errors import ModelLoadError
from valora.layers.rope_scaling import RopeConfig, compute_inv_freq
from valora.models.rope_config import parse_rope_config

TEXT_MODEL_TYPES = ("llama", "mistral")
# LlavaConfig's defaults for a vision_config that omits keys (CLIP ViT-L/14-336).
_LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
                          "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}


@dataclass(frozen=True)
class TextConfig:
    """The Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class MultimodalConfig:
    """How LLaVA turns vision-tower hidden states into language-model embeddings.

    ``feature_layers``: indices into the tower's hidden states (``0`` = embeddings after the
    pre-layernorm, ``i`` = output of encoder layer ``i``; negative counts from the end); more than
    one means their features are concatenated. ``select_strategy``: ``"default"`` drops the CLS
    position, ``"full"`` keeps it.
    """

    image_token_id: int
    feature_layers: tuple[int, ...]
    select_strategy: str
    projector_hidden_act: str
    projector_bias: bool
    num_image_tokens: int


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything valora reads from a checkpoint directory's configs."""

    architecture: str
    text: TextConfig
    vision: VisionConfig | None = None
    multimodal: MultimodalConfig | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)  # type: ignore[call-overload]


def parse_text_config(raw: dict[str, Any], generation: dict[str, Any]) -> TextConfig:
    """Parse a Llama/Mistral text config (``raw``) with eos ids from ``generation``."""
    model_type = str(raw.get("model_type", "llama"))
    if model_type not in TEXT_MODEL_TYPES:
        raise ModelLoadError(f"unsupported text model_type {model_type!r}; "
                             f"supported: {list(TEXT_MODEL_TYPES)}")
    window = raw.get("sliding_window")
    max_pos = int(raw.get("max_position_embeddings", 2048))
    if window is not None and int(window) < max_pos:
        raise ModelLoadError(f"sliding-window attention (sliding_window={window} < "
                             f"max_position_embeddings={max_pos}) is not supported")
    hidden, heads = int(raw.get("hidden_size", 4096)), int(raw.get("num_attention_heads", 32))
    head_dim = int(raw.get("head_dim") or hidden // heads)
    rope = parse_rope_config(raw, max_pos)
    try:
        compute_inv_freq(rope, head_dim)
    except ValueError as exc:
        raise ModelLoadError(f"bad RoPE parameters: {exc}") from exc
    eos_ids = _ids(generation.get("eos_token_id")) + _ids(raw.get("eos_token_id", 2))
    eos = tuple(dict.fromkeys(eos_ids))
    bos, pad = raw.get("bos_token_id", 1), raw.get("pad_token_id")
    return TextConfig(
        model_type=model_type, vocab_size=int(raw.get("vocab_size", 32000)), hidden_size=hidden,
        intermediate_size=int(raw.get("intermediate_size", 11008)),
        num_layers=int(raw.get("num_hidden_layers", 32)), num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
        hidden_act=str(raw.get("hidden_act", "silu")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), max_position_embeddings=max_pos,
        rope=rope, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos,
        pad_token_id=None if pad is None else int(pad),
    )


def parse_vision_config(raw: dict[str, Any]) -> VisionConfig:
    """Parse a ``clip_vision_model`` config, LLaVA's defaults for missing keys."""
    model_type = raw.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise ModelLoadError(
            f"unsupported vision tower {model_type!r}; supported: clip_vision_model")
    merged = {**_LLAVA_VISION_DEFAULTS, **raw}
    return VisionConfig(
        hidden_size=int(merged["hidden_size"]), intermediate_size=int(merged["intermediate_size"]),
        num_layers=int(merged["num_hidden_layers"]), num_heads=int(merged["num_attention_heads"]),
        image_size=int(merged["image_size"]), patch_size=int(merged["patch_size"]),
        num_channels=int(merged.get("num_channels", 3)),
        layer_norm_eps=float(merged.get("layer_norm_eps", 1e-5)),
        hidden_act=str(merged.get("hidden_act", "quick_gelu")),
    )


def parse_multimodal_config(raw: dict[str, Any], vision: VisionConfig) -> MultimodalConfig:
    """Parse LLaVA's top-level keys; ``num_image_tokens`` follows from the tower's geometry."""
    layer = raw.get("vision_feature_layer", -2)
    layers = tuple(int(v) for v in layer) if isinstance(layer, list) else (int(layer),)
    num_states = vision.num_layers + 1
    for index in layers:
        if not -num_states <= index < num_states:
            raise ModelLoadError(f"vision_feature_layer {index} out of range for a tower with "
                                 f"{vision.num_layers} layers")
    strategy = str(raw.get("vision_feature_select_strategy", "default"))
    if strategy not in ("default", "full"):
        raise ModelLoadError(f"unsupported vision_feature_select_strategy {strategy!r}")
    image_token = raw.get("image_token_index", raw.get("image_token_id", 32000))
    return MultimodalConfig(
        image_token_id=int(image_token), feature_layers=layers, select_strategy=strategy,
        projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        num_image_tokens=vision.num_patches + (1 if strategy == "full" else 0),
    )


def load_checkpoint_config(path: str | Path) -> CheckpointConfig:
    """Read ``path/config.json`` (and ``generation_config.json`` if present)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} has no config.json (not a checkpoint directory)")
    raw = _read_json(directory / "config.json")
    gen_path = directory / "generation_config.json"
    generation = _read_json(gen_path) if gen_path.is_file() else {}
    architectures = raw.get("architectures") or []
    if not architectures:
        raise ModelLoadError(f"{directory}/config.json names no 'architectures'")
    architecture = str(architectures[0])
    if "text_config" not in raw and "vision_config" not in raw:
        return CheckpointConfig(architecture, parse_text_config(raw, generation))
    text_raw = dict(raw.get("text_config") or {})
    # LlavaConfig: the top-level flag wins when set, else the text config's is used.
    text_raw["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings")) or bool(
        text_raw.get("tie_word_embeddings", False))
    vision = parse_vision_config(dict(raw.get("vision_config") or {}))
    return CheckpointConfig(architecture, parse_text_config(text_raw, generation), vision,
                            parse_multimodal_config(raw, vision))
