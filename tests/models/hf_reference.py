"""Reference side of the parity tests: transformers models and HF-processed prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def random_image(seed: int, size: tuple[int, int] = (40, 52)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_prompt(path: Path, num_images: int, seed: int = 0) -> tuple[list[int], torch.Tensor | None]:
    """Token ids (image placeholders expanded by the HF processor) and pixel values."""
    from transformers import AutoProcessor, AutoTokenizer

    words = "USER: Describe the image in detail and count the shapes. What colour is the square?"
    if num_images == 0:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return list(tokenizer(words + " ASSISTANT:")["input_ids"]), None
    processor = AutoProcessor.from_pretrained(str(path))
    text = "USER: <image>\n" + words + "".join(" <image> and" for _ in range(num_images - 1))
    images = [random_image(seed + i) for i in range(num_images)]
    out = processor(text=text + " ASSISTANT:", images=images, return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"]


def hf_model(path: Path) -> Any:
    """A fresh float32 transformers model (fresh: dynamic RoPE keeps state between calls)."""
    from transformers import AutoConfig, LlamaForCausalLM, LlavaForConditionalGeneration

    arch = AutoConfig.from_pretrained(str(path)).architectures[0]
    is_llava = arch == "LlavaForConditionalGeneration"
    cls = LlavaForConditionalGeneration if is_llava else LlamaForCausalLM
    return cls.from_pretrained(str(path), dtype=torch.float32).eval()
