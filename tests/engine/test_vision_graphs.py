"""The vision tower replayed per image-count bucket (``valora.engine.vision_graphs``): on the CPU
its static-buffer path runs eagerly and must equal ``encode_images`` exactly, for every count a
bucket holds (padding rows dropped) and beyond the largest (eager); the engine's outputs do not
change with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from valora import LLM, SamplingParams
from valora.engine.vision_graphs import VisionGraphRunner, image_buckets, images_per_step
from valora.errors import ValoraError


@pytest.fixture(scope="module")
def llm(tiny_llava: Path) -> LLM:
    return LLM(model=str(tiny_llava), dtype="float32", device="cpu", num_pages=128, page_size=8,
               enable_prefix_caching=False)


def test_buckets_cover_up_to_the_most_images_a_step_needs() -> None:
    assert image_buckets(5) == (1, 2, 4, 5)
    assert image_buckets(1) == (1,)
    assert image_buckets(8) == (1, 2, 4, 8)
    with pytest.raises(ValoraError):
        image_buckets(0)


def test_images_per_step_follows_the_token_budget(llm: LLM) -> None:
    model = llm.engine.parts.runner.model
    tower = model.vision_tower.embeddings
    per_image = (tower.image_size // tower.patch_embedding.patch_size) ** 2
    assert images_per_step(model, 3 * per_image) == 5  # three whole images + two cut ones
    assert images_per_step(model, 1_000_000) == 8
    assert images_per_step(object(), 4096) == 0  # no vision tower


def test_static_buffer_path_equals_the_eager_tower(llm: LLM) -> None:
    model = llm.engine.parts.runner.model
    runner = VisionGraphRunner(model, 3, use_graphs=False)
    assert runner.buckets == (1, 2, 3) and runner.active_buckets == (1, 2, 3)
    size = model.vision_tower.embeddings.image_size
    generator = torch.Generator().manual_seed(0)
    for count in (1, 2, 3, 5):  # 5: beyond the largest bucket, eager
        pixels = torch.randn(count, 3, size, size, generator=generator)
        got = runner.encode(pixels)
        assert torch.equal(got, model.encode_images(pixels)), count
    assert (runner.num_replays, runner.num_eager) == (3, 1)
    kept = runner.encode(pixels[:1])
    runner.encode(torch.randn(1, 3, size, size, generator=generator))
    assert torch.equal(kept, model.encode_images(pixels[:1]))  # a copy, not the static output
    with pytest.raises(ValoraError):
        VisionGraphRunner(model, 2, use_graphs=True)  # no CUDA here


def test_engine_outputs_are_unchanged_with_the_vision_runner(
        llm: LLM, images: list[Image.Image]) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [{"prompt": "USER: <image>\nWhat is it? ASSISTANT:", "images": [image],
                "sampling_params": params} for image in images]
    runner = llm.engine.parts.runner
    before = [out.outputs[0].token_ids for out in llm.generate(prompts)]
    runner.image_cache.clear()
    assert runner.enable_vision_graphs(4, use_graphs=False)
    try:
        after = [out.outputs[0].token_ids for out in llm.generate(prompts)]
        assert runner.vision_graphs is not None and runner.vision_graphs.num_replays >= 1
    finally:
        runner.vision_graphs = None
    assert after == before
