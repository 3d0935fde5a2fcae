"""The HF transformers + PEFT peer at the same shapes: what a newcomer would run.

Decode step: ``model(input_ids [B, 1], past_key_values=cache)`` after a text prefill of ``ctx``
tokens built the cache (HF's ``DynamicCache``; it grows by one token per timed step, as in
``generate``). Modes: base; one adapter (rank 16, all seven projections of the language model);
``adapter_names`` mixed batch over 8 such adapters (PEFT's mixed-batch path); merged
(``merge_adapter`` of one adapter). Image prefill: ``pixel_values`` + prompts with 576 image
tokens. Times with CUDA events, median of ``repeats`` after two warm-ups.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build_hf(config_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig.from_dict(json.loads((config_dir / "config.json").read_text()))
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def add_adapters(model: Any, count: int, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                          init_lora_weights=False)

    peft_model = get_peft_model(model, config(), adapter_name="a0")
    for index in range(1, count):
        peft_model.add_adapter(f"a{index}", config())
    peft_model.set_adapter("a0")
    return peft_model.eval()


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


@torch.inference_mode()
def decode_times(model: Any, batch: int, context: int, vocab: int, image_token: int,
                 repeats: int, device: torch.device,
                 adapter_names: list[str] | None = None) -> list[float]:
    """Per-step times (ms) of ``batch`` sequences decoding after a ``context``-token prefill."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, vocab - 100, (batch, context), generator=generator)
    prompt[prompt == image_token] = 0
    prompt = prompt.to(device)
    extra: dict[str, Any] = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **extra)
    cache = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)

    def step() -> None:
        model(input_ids=token, past_key_values=cache, use_cache=True, **extra)

    return time_ms(step, repeats, device)


@torch.inference_mode()
def prefill_times(model: Any, prompts: int, prompt_len: int, image_token: int, image_size: int,
                  num_image_tokens: int, vocab: int, repeats: int,
                  device: torch.device) -> list[float]:
    ids = torch.randint(0, vocab - 100, (prompts, prompt_len))
    ids[ids == image_token] = 0
    ids[:, :num_image_tokens] = image_token
    pixels = torch.randn(prompts, 3, image_size, image_size).to(device, model.dtype)
    ids = ids.to(device)

    def run() -> None:
        model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)

    return time_ms(run, repeats, device)


def run_peer(config_dir: Path, device: torch.device, batches: list[int], context: int,
             repeats: int, spec: dict[str, int], emit: Callable[[dict[str, Any]], None]) -> None:
    """Every HF + PEFT figure, one ``emit``-ted row each (``mode``, ``batch``, samples)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_hf(config_dir, device, dtype)
    vocab, image = spec["vocab_size"], spec["image_token_id"]

    def row(mode: str, batch: int, samples: list[float], **extra: Any) -> None:
        emit({"peer": "hf_peft", "mode": mode, "batch": batch, "median_ms": statistics.median(
            samples), "min_ms": min(samples), "max_ms": max(samples), **extra})

    prompts = 4
    row("prefill_images", prompts, prefill_times(
        model, prompts, context, spec["image_token_id"], spec["image_size"],
        spec["num_image_tokens"], vocab, max(3, repeats // 2), device),
        tokens=prompts * context)
    for batch in batches:
        row("base", batch, decode_times(model, batch, context, vocab, image, repeats, device))
    peft_model = add_adapters(model, 8, 16)
    for batch in batches:
        row("one_adapter_r16", batch, decode_times(peft_model, batch, context, vocab, image,
                                                   repeats, device))
    for batch in batches:
        names = [f"a{i % 8}" for i in range(batch)]
        row("adapter_names_mixed8_r16", batch, decode_times(
            peft_model, batch, context, vocab, image, max(3, repeats // 2), device, names))
    begin = time.perf_counter()
    peft_model.merge_adapter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    merge_ms = (time.perf_counter() - begin) * 1e3
    for batch in batches:
        row("merged_r16", batch, decode_times(peft_model, batch, context, vocab, image, repeats,
                                                device),
            merge_ms=merge_ms)
    peft_model.unmerge_adapter()
