"""ImageProcessor parity with transformers' CLIP image processor (PIL backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from valora.errors import ModelLoadError
from valora.multimodal.processor import ImageProcessor


def _hf_processor(config: dict[str, Any]) -> Any:
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL path is the default class
        from transformers import CLIPImageProcessor as Processor
    return Processor(**config)


def _hf(config: dict[str, Any], image: Image.Image) -> torch.Tensor:
    out = _hf_processor(config)(image, return_tensors="pt")
    return out["pixel_values"][0].float()


def _images() -> list[Image.Image]:
    from skimage import data

    rng = np.random.default_rng(0)
    astronaut = Image.fromarray(data.astronaut())
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((50, 37), (37, 50), (32, 32), (20, 100), (9, 17), (301, 299))]
    images += [astronaut, astronaut.crop((0, 100, 512, 300)), astronaut.crop((200, 0, 260, 512)),
               astronaut.resize((123, 77))]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA"))
    images.append(astronaut.convert("L"))
    return images


CONFIGS: dict[str, dict[str, Any]] = {
    "tiny_clip": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    "clip_224": {},
    "odd_crop_bilinear": {"size": {"shortest_edge": 45}, "crop_size": {"height": 41, "width": 27},
                          "resample": 2},
    "crop_larger_than_resize": {"size": {"shortest_edge": 20},
                                "crop_size": {"height": 24, "width": 24}},
    "fixed_hw_no_crop": {"size": {"height": 30, "width": 40}, "do_center_crop": False,
                         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(name: str) -> None:
    config = CONFIGS[name]
    ours = ImageProcessor.from_dict(config)
    for image in _images():
        got, expected = ours(image), _hf(config, image)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert got.shape[1:] == (ours.output_shape or got.shape[1:])
        assert (got - expected).abs().max().item() <= 1e-5, (name, image.size, image.mode)


def test_from_pretrained_reads_processor_config(llava_dir: Path, tmp_path: Path) -> None:
    ours = ImageProcessor.from_pretrained(llava_dir)
    assert (ours.shortest_edge, ours.crop_hw, ours.resample) == (32, (32, 32), 3)
    section = json.loads((llava_dir / "processor_config.json").read_text())["image_processor"]
    image = _images()[0]
    torch.testing.assert_close(ours(image), _hf(section, image), rtol=0, atol=1e-5)
    # preprocessor_config.json wins when both exist
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": section}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**section, "crop_size": 16}))
    assert ImageProcessor.from_pretrained(tmp_path).crop_hw == (16, 16)


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no image processor config"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported image processor size"):
        ImageProcessor.from_dict({"size": {"shortest_edge": 32, "longest_edge": 64}})
    with pytest.raises(ModelLoadError, match="image_mean must have 3 values"):
        ImageProcessor.from_dict({"image_mean": [0.5, 0.5]})
