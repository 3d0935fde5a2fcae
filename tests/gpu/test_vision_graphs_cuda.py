"""The vision tower captured per image-count bucket on CUDA (``valora.engine.vision_graphs``):
every replay equals the eager tower (fp32 exactly up to cuBLAS's order, bf16 within tolerance),
for every count a bucket holds, after the inputs change; beyond the largest bucket it is eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from valora.engine.vision_graphs import TOLERANCE, VisionGraphRunner
from valora.models.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_fp32")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replays_match_the_eager_tower(tiny_llava: Path, dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = load_model(str(tiny_llava), dtype=dtype, device="cuda", attention_backend="triton")
    runner = VisionGraphRunner(model, 3)
    runner.capture()
    assert runner.active_buckets == (1, 2, 3)  # every bucket captured and self-checked
    size = model.vision_tower.embeddings.image_size
    generator = torch.Generator(device="cuda").manual_seed(1)
    with torch.inference_mode():
        for count in (1, 2, 3, 2, 4):
            pixels = torch.randn(count, 3, size, size, generator=generator, device="cuda")
            got = runner.encode(pixels).float()
            expected = model.encode_images(pixels).float()
            error = float((got - expected).norm() / expected.norm())
            assert error <= TOLERANCE[dtype], (count, error)
    assert (runner.num_replays, runner.num_eager) == (4, 1)
