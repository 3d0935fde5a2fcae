"""The GPU path (Triton attention, Triton LoRA, CUDA graphs) against the CPU reference path
(torch attention, reference LoRA, no graphs) on a tiny LLaVA with an image and adapters.

fp32: greedy tokens identical for 32 decode steps. bf16: teacher-forced logits within bf16
tolerance of the fp32 CPU reference. Both need a GPU (marked ``gpu``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attn_cases import rel_err
from gpu_stepper import Sequence, Stepper, fill_slots

import valora.layers.attention_triton  # noqa: F401  (registers the "triton" backend)
from valora.engine.cuda_graph import CudaGraphRunner
from valora.models.base import CausalLMBase
from valora.models.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]


NUM_SLOTS, MAX_RANK, PAGE_SIZE, STEPS = 4, 16, 16, 32
SLOTS = [-1, 0, 1, 2, 0]


def build(path: Path, backend: str, device: str, dtype: torch.dtype) -> CausalLMBase:
    model = load_model(str(path), dtype=dtype, device=device, attention_backend=backend)
    model.init_lora(NUM_SLOTS, MAX_RANK)
    fill_slots(model, [16, 4, 9], seed=5, std=0.1)
    return model


def sequences(model: CausalLMBase) -> list[Sequence]:
    """Five prompts; the first two carry one image each (its rows from this model's tower)."""
    spec = model.spec
    assert spec.image_token_id is not None and spec.num_image_tokens is not None
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, spec.image_size or 32, spec.image_size or 32, generator=generator)
    with torch.inference_mode():
        rows = model.encode_images(pixels.to(model.device, model.dtype))
    out = []
    for i, slot in enumerate(SLOTS):
        text = torch.randint(0, spec.vocab_size - 1, (6 + 5 * i,), generator=generator).tolist()
        image = [spec.image_token_id] * spec.num_image_tokens if i < 2 else []
        out.append(Sequence(text[:3] + image + text[3:], lora_slot=slot,
                            image_rows=rows[i] if i < 2 else None))
    return out


def run(model: CausalLMBase, graphs: bool, steps: int, forced: list[list[int]] | None = None
        ) -> tuple[list[list[int]], list[torch.Tensor]]:
    stepper = Stepper(model, 256, PAGE_SIZE, NUM_SLOTS, "triton" if graphs else "reference")
    seqs = sequences(model)
    runner = None
    if graphs:
        runner = CudaGraphRunner(model, 8, max_context=512, page_size=PAGE_SIZE,
                                 num_lora_slots=NUM_SLOTS)
        runner.capture()
    return stepper.greedy(seqs, steps, 7, runner, forced)


def test_fp32_greedy_tokens_identical(tiny_llava: Path) -> None:
    got, _ = run(build(tiny_llava, "triton", "cuda", torch.float32), True, STEPS)
    want, _ = run(build(tiny_llava, "torch", "cpu", torch.float32), False, STEPS)
    assert got == want


def test_bf16_logits_within_tolerance(tiny_llava: Path) -> None:
    """The bf16 GPU run is teacher-forced with the fp32 reference's greedy tokens, so every
    step's logits compare like for like."""
    want_tokens, want = run(build(tiny_llava, "torch", "cpu", torch.float32), False, 8)
    got_tokens, got = run(build(tiny_llava, "triton", "cuda", torch.bfloat16), True, 8,
                          forced=want_tokens)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert rel_err(a, b) < 3e-2, f"decode step {step}"
    agree = sum(a == b for x, y in zip(got_tokens, want_tokens, strict=True)
                for a, b in zip(x, y, strict=True))
    assert agree >= 0.9 * len(SLOTS) * 8, "bf16 argmax differs beyond near-ties"
