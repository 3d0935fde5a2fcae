"""Greedy generation with Hugging Face transformers (+ PEFT) as the reference for engine tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def load_hf(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).eval()
    return model, AutoProcessor.from_pretrained(str(model_dir))


def hf_inputs(
    processor: Any, prompt: str, images: Sequence[Image.Image]
) -> dict[str, torch.Tensor]:
    if images:
        return dict(processor(text=prompt, images=list(images), return_tensors="pt"))
    return dict(processor.tokenizer(prompt, return_tensors="pt"))


@torch.inference_mode()
def hf_greedy(
    model: Any,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    adapter_names: list[str] | None = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of every step's logits, recomputing the full sequence each
    step (no cache: the simplest possible reference)."""
    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    tokens: list[int] = []
    logprobs: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = dict(input_ids=ids, **extra)
        if adapter_names is not None:
            kwargs["adapter_names"] = adapter_names
        logits = model(**kwargs).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        token = int(torch.argmax(lp))
        tokens.append(token)
        logprobs.append(lp)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs
