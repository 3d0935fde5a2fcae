"""Tiny random-weight checkpoints in Hugging Face format, built offline.

They exercise the features that matter for parity (GQA, a non-trivial RoPE scaling, an untied LM
head, CLIP feature-layer selection) at sizes that run in milliseconds on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from valora.testing.tokenizer import save_tokenizer

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class TinySpec:
    """Shape knobs of a tiny LLaVA (defaults: GQA 4q/2kv heads, llama3 RoPE, untied head)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    rope_type: str = "llama3"
    tie_word_embeddings: bool = False
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    seed: int = 0


def _rope_parameters(spec: TinySpec) -> dict[str, object]:
    if spec.rope_type == "llama3":
        return {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    if spec.rope_type == "linear":
        return {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    if spec.rope_type == "dynamic":
        return {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    return {"rope_type": "default", "rope_theta": 10000.0}


def build_tiny_llava(directory: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a random tiny ``LlavaForConditionalGeneration`` checkpoint with tokenizer + processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = spec or TinySpec()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(out, spec.vocab_size)
    image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # type: ignore[arg-type]
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = _llama_config(spec, tokenizer, rms_norm_eps=1e-5)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model)
    model.save_pretrained(str(out))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(str(out))
    return out


def _llama_config(spec: TinySpec, tokenizer: Any, **extra: Any) -> Any:
    """The tiny Llama decoder config shared by the text-only and LLaVA builders."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=_rope_parameters(spec),
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _randomize(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 0.08) (larger than HF's init, so that every layer matters in the logits),
    1-D parameters (norm scales, biases) ~ U(0.8, 1.2)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08) if p.dim() > 1 else p.uniform_(0.8, 1.2)


def build_tiny_llama(directory: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a random tiny text-only ``LlamaForCausalLM`` checkpoint with tokenizer."""
    from transformers import LlamaForCausalLM

    spec = spec or TinySpec()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(out, spec.vocab_size)
    config = _llama_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    _randomize(model)
    model.save_pretrained(str(out))
    return out


LANGUAGE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    rank: int,
    *,
    alpha: float | None = None,
    targets: tuple[str, ...] = LANGUAGE_MODULES,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.1,
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) with
    random non-zero A and B for the language model's ``targets`` of the checkpoint at ``base_dir``.

    Keys follow PEFT's naming for the base architecture (``base_model.model.<module>.lora_A.weight``),
    so PEFT itself loads the result; the target regex keeps the vision tower out.
    """
    config = json.loads((Path(base_dir) / "config.json").read_text())
    is_llava = "text_config" in config
    text = config["text_config"] if is_llava else config
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    inter = int(text["intermediate_size"])
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    prefix = (
        "base_model.model.model.language_model.layers"
        if is_llava
        else "base_model.model.model.layers"
    )
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(text["num_hidden_layers"])):
        for name in targets:
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fan_in, fan_out = shapes[name]
            key = f"{prefix}.{layer}.{kind}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * std
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    target_regex = (
        (r".*language_model.*\.(" if is_llava else r".*layers.*\.(") + "|".join(targets) + ")"
    )
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": target_regex,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(Path(base_dir).resolve()),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
