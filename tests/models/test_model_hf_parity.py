"""Parity with transformers on tiny checkpoints: prefill, greedy decode, image features."""

from __future__ import annotations

import pytest
import torch
from conftest import CheckpointFactory
from hf_reference import hf_model, hf_prompt
from paged_batch import Chunk, PagedRunner, image_rows_for, rel_err

from valora.models import load_model

TOL = 1e-4
DECODE_STEPS = 32


def _our_prefill(runner: PagedRunner, tokens: list[int],
                 pixels: torch.Tensor | None) -> torch.Tensor:
    model = runner.model
    rows = None
    if pixels is not None:
        with torch.inference_mode():
            embeds = model.encode_images(pixels)
        assert model.spec.image_token_id is not None
        rows = image_rows_for(tokens, model.spec.image_token_id,
                              embeds.reshape(-1, model.spec.hidden_size), 0, len(tokens))
    seq = runner.add_sequence()
    return runner.run([Chunk(seq, tokens, image_rows=rows)])[0]


def check_prefill_and_decode(path: object, num_images: int, steps: int) -> None:
    """Every prefill position, then ``steps`` greedy decode steps, against HF with its cache."""
    tokens, pixels = hf_prompt(path, num_images)  # type: ignore[arg-type]
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    runner = PagedRunner(model)
    ours = _our_prefill(runner, tokens, pixels)
    hf = hf_model(path)  # type: ignore[arg-type]
    with torch.inference_mode():
        kwargs = {"pixel_values": pixels} if pixels is not None else {}
        out = hf(input_ids=torch.tensor([tokens]), use_cache=True, **kwargs)
        assert ours.shape == out.logits[0].shape
        assert rel_err(ours, out.logits[0]) < TOL
        cache, hf_last, our_last = out.cache, out.logits[0, -1], ours[-1]
        for step in range(steps):
            token = int(hf_last.argmax())
            assert int(our_last.argmax()) == token, f"greedy token differs at step {step}"
            our_last = runner.run([Chunk(0, [token])])[0][-1]
            out = hf(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache, hf_last = out.cache, out.logits[0, -1]
            assert rel_err(our_last, hf_last) < TOL, f"decode step {step}"


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_default_llava_prefill_and_decode_match_hf(checkpoint: CheckpointFactory,
                                                    num_images: int) -> None:
    check_prefill_and_decode(checkpoint("default"), num_images, DECODE_STEPS)


@pytest.mark.parametrize("variant", ["rope_linear", "rope_dynamic", "rope_default_tied",
                                     "select_full", "feature_layers"])
def test_llava_variants_match_hf(checkpoint: CheckpointFactory, variant: str) -> None:
    check_prefill_and_decode(checkpoint(variant), 2, DECODE_STEPS)


def test_plain_llama_matches_hf(checkpoint: CheckpointFactory) -> None:
    check_prefill_and_decode(checkpoint("llama"), 0, DECODE_STEPS)


@pytest.mark.parametrize("variant", ["default", "select_full", "feature_layers"])
def test_encode_images_matches_hf_image_features(checkpoint: CheckpointFactory,
                                                 variant: str) -> None:
    path = checkpoint(variant)
    _, pixels = hf_prompt(path, 3, seed=7)
    assert pixels is not None
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        ours = model.encode_images(pixels)
        features = hf_model(path).get_image_features(pixel_values=pixels)
    # transformers 5 returns a model output whose pooler_output is a list of per-image tensors.
    pooled = getattr(features, "pooler_output", features)
    reference = torch.stack(list(pooled)) if isinstance(pooled, list | tuple) else pooled
    assert model.spec.num_image_tokens is not None
    assert ours.shape == (3, model.spec.num_image_tokens, model.spec.hidden_size)
    assert ours.shape == reference.shape
    assert rel_err(ours, reference) < TOL
