"""A sequence's logits do not depend on batching, chunking or where its pages lie."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import CheckpointFactory
from hf_reference import hf_model, hf_prompt
from paged_batch import Chunk, PagedRunner, image_rows_for, rel_err

from valora.errors import ValoraError
from valora.layers.attention import (
    available_attention_backends,
    create_attention_backend,
    write_kv_cache,
)
from valora.models import load_model
from valora.models.base import CausalLMBase

TOL = 1e-4
Schedule = list[list[tuple[int, int]]]  # per step: (sequence, number of new tokens)


def run_schedule(model: CausalLMBase, prompts: list[list[int]], pixels: list[torch.Tensor | None],
                 schedule: Schedule, seed: int) -> list[torch.Tensor]:
    """Feed each sequence's tokens in the scheduled chunk sizes; logits of all its positions."""
    runner = PagedRunner(model, seed=seed)
    rows: list[torch.Tensor | None] = []
    with torch.inference_mode():
        for pix in pixels:
            rows.append(None if pix is None
                        else model.encode_images(pix).reshape(-1, model.spec.hidden_size))
    seqs = [runner.add_sequence() for _ in prompts]
    done = [0] * len(prompts)
    outputs: list[list[torch.Tensor]] = [[] for _ in prompts]
    image_token = model.spec.image_token_id
    for step in schedule:
        chunks = []
        for seq, count in step:
            start, end = done[seq], done[seq] + count
            image = rows[seq]
            chunk_rows = (image_rows_for(prompts[seq], image_token, image, start, end)
                          if image is not None and image_token is not None else None)
            chunks.append(Chunk(seqs[seq], prompts[seq][start:end], image_rows=chunk_rows))
            done[seq] = end
        for (seq, _), logits in zip(step, runner.run(chunks), strict=True):
            outputs[seq].append(logits)
    assert done == [len(p) for p in prompts], "schedule must consume every token"
    return [torch.cat(out) for out in outputs]


def _sequences(path: object) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Four prompts (0, 1, 2, 0 images) each followed by fixed 'generated' tokens."""
    prompts, pixels = [], []
    for index, num_images in enumerate([1, 0, 2, 0]):
        tokens, pix = hf_prompt(path, num_images, seed=10 * index)  # type: ignore[arg-type]
        tokens = tokens[: 12 + 3 * index] if num_images == 0 else tokens
        prompts.append(tokens + [(37 * index + 11 * k) % 400 + 5 for k in range(6)])
        pixels.append(pix)
    return prompts, pixels


def test_mixed_batch_matches_each_sequence_alone(checkpoint: CheckpointFactory) -> None:
    path = checkpoint("default")
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    prompts, pixels = _sequences(path)
    alone = []
    for seq, prompt in enumerate(prompts):
        prompt_len = len(prompt) - 6
        solo: Schedule = [[(0, prompt_len)]] + [[(0, 1)]] * 6
        alone.append(run_schedule(model, [prompt], [pixels[seq]], solo, seed=seq)[0])
    a, b, c, d = (len(p) - 6 for p in prompts)
    mixed: Schedule = [
        [(0, a), (1, 5)],                       # full prefill + first chunk
        [(0, 1), (1, b - 5), (2, 20)],          # decode, rest of a prefill, a chunk mid-image
        [(2, c - 20), (0, 1), (1, 1), (3, d)],  # decodes between prefills, out of order
        [(3, 1), (2, 1), (1, 1), (0, 1)],
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(3, 1), (0, 1), (1, 1), (2, 1)],
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(1, 1), (2, 1), (3, 1)],
        [(2, 1), (3, 1)],
    ]
    batched = run_schedule(model, prompts, pixels, mixed, seed=99)
    for seq in range(len(prompts)):
        assert batched[seq].shape == alone[seq].shape
        assert rel_err(batched[seq], alone[seq]) < TOL, f"sequence {seq}"


@pytest.mark.parametrize("variant", ["default", "rope_dynamic"])
def test_three_chunk_prefill_equals_one_shot(checkpoint: CheckpointFactory, variant: str) -> None:
    path = checkpoint(variant)
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    tokens, pix = hf_prompt(path, 2, seed=3)
    one_shot = run_schedule(model, [tokens], [pix], [[(0, len(tokens))]], seed=1)[0]
    # Boundaries inside the first and second image's placeholder runs.
    first, second = 9, 30
    chunks: Schedule = [[(0, first)], [(0, second - first)], [(0, len(tokens) - second)]]
    chunked = run_schedule(model, [tokens], [pix], chunks, seed=2)[0]
    if variant == "rope_dynamic":
        # Dynamic NTK frequencies depend on the context length when a token's K is written, so
        # chunking legitimately changes the result (as in transformers with a cache): compare
        # with transformers fed the same chunks through its cache instead.
        assert first < model.spec.max_position_embeddings < len(tokens)
        assert rel_err(chunked, one_shot) > 10 * TOL
        reference = hf_chunked_logits(path, tokens, pix, [first, second])
        assert rel_err(chunked, reference) < TOL
        return
    assert rel_err(chunked, one_shot) < TOL


def hf_chunked_logits(path: object, tokens: list[int], pixels: torch.Tensor | None,
                      boundaries: list[int]) -> torch.Tensor:
    """transformers' logits when the prompt's input embeddings arrive in chunks with a cache."""
    hf = hf_model(path)  # type: ignore[arg-type]
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        embeds = hf.get_input_embeddings()(ids)
        if pixels is not None:
            features = hf.get_image_features(pixel_values=pixels).pooler_output
            mask = (ids == hf.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, torch.cat(list(features)))
        cache, logits = None, []
        edges = [0, *boundaries, len(tokens)]
        for start, end in itertools.pairwise(edges):
            out = hf(inputs_embeds=embeds[:, start:end], cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[0])
    return torch.cat(logits)


def test_bfloat16_model_tracks_float32(checkpoint: CheckpointFactory) -> None:
    path = checkpoint("default")
    tokens, pix = hf_prompt(path, 1)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(str(path), dtype=dtype, device="cpu")
        assert model.dtype == dtype
        logits[dtype] = run_schedule(model, [tokens], [pix], [[(0, len(tokens))]], seed=0)[0]
    assert logits[torch.bfloat16].dtype == torch.float32
    assert torch.isfinite(logits[torch.bfloat16]).all()
    assert rel_err(logits[torch.bfloat16], logits[torch.float32]) < 5e-2


def test_attention_backend_registry_and_kv_layout() -> None:
    assert "torch" in available_attention_backends()
    assert create_attention_backend("torch").name == "torch"
    with pytest.raises(ValoraError, match="unknown attention backend"):
        create_attention_backend("no-such-backend")
    k_cache = torch.zeros(5, 4, 2, 3)
    v_cache = torch.zeros(5, 4, 2, 3)
    key, value = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    write_kv_cache(key, value, (k_cache, v_cache), torch.tensor([17, 2, 8]))
    assert torch.equal(k_cache[4, 1], key[0]) and torch.equal(v_cache[4, 1], value[0])
    assert torch.equal(k_cache[0, 2], key[1]) and torch.equal(k_cache[2, 0], key[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 3
