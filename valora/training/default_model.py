"""The embedded default model: architecture, initialisation and Hugging Face format I/O.

A ``LlavaForConditionalGeneration``: a CLIP vision tower over ``image_size``² RGB images cut into
``patch_size``² patches (the last layer's patch features, CLS dropped, so
``(image_size / patch_size)²`` image tokens), LLaVA's 2-layer GELU MLP projector, and a small
Llama decoder (grouped-query attention, default RoPE, untied LM head) over the tokenizer of
``default_tokenizer``. ``save_default_model`` writes the directory that transformers' and valora's
loaders read: ``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files and
the ``LlavaProcessor`` configs (``num_additional_image_tokens=1``, strategy ``default``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from valora.training.default_tokenizer import IMAGE_TOKEN

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DefaultModelSpec:
    """Size knobs of the default model (the defaults are the shipped model's)."""

    vocab_size: int = 1024  # upper bound for the BPE; the model uses the tokenizer's real size
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    vision_hidden: int = 128
    vision_intermediate: int = 512
    vision_layers: int = 4
    vision_heads: int = 4
    image_size: int = 64
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.num_heads % self.num_kv_heads or self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must divide into num_heads, and num_heads into "
                             "num_kv_heads")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image after the processor expands ``<image>``."""
        return (self.image_size // self.patch_size) ** 2


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """Id of the ``<image>`` placeholder token."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(token_id, int)
    return token_id


def build_config(spec: DefaultModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The ``LlavaConfig`` for ``spec`` with the tokenizer's special-token ids."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=image_token_id(tokenizer),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def build_processor(spec: DefaultModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A ``LlavaProcessor``: resize the short side to ``image_size``, centre-crop, CLIP-normalise."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def init_model(
    spec: DefaultModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int
) -> LlavaForConditionalGeneration:
    """A freshly initialised model (transformers' own init, seeded), in float32 train mode."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(spec, tokenizer))
    return model.float().train()


def save_default_model(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    spec: DefaultModelSpec,
    directory: Path,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write ``model`` (cast to ``dtype``) with tokenizer, processor and generation config.

    ``extra`` is merged into ``valora_default_model.json`` next to the weights, together with the
    spec, so a reader can tell how the weights were made.
    """
    import json

    directory.mkdir(parents=True, exist_ok=True)
    copy = LlavaForConditionalGeneration(model.config)
    copy.load_state_dict(model.state_dict())
    torch.nn.Module.to(copy, dtype=dtype)  # in place (transformers' ``to`` is mistyped)
    copy.eval()
    copy.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=32,
    )
    copy.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    build_processor(spec, tokenizer).save_pretrained(str(directory))
    info = {"spec": asdict(spec), "dtype": str(dtype).removeprefix("torch."), **(extra or {})}
    (directory / "valora_default_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory
