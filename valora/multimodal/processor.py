"""CLIP-style image preprocessing: RGB → resize → center crop → rescale → normalise.

Semantics (matching transformers' ``CLIPImageProcessor``, PIL backend)::

    rgb    = convert_to_rgb(image)                       # alpha composited onto white
    h, w   = shortest_edge: short side -> S, long side -> int(S * long / short)
             or the configured (height, width)
    img    = rgb.resize((w, h), resample)                # PIL, uint8
    img    = center_crop(img, crop)                      # top = (H - ch) // 2; zero-pad if smaller
    x      = float32(float64(img) * rescale_factor)
    x      = (x - mean) / std                            # float32, per channel
    return   x as float32 tensor [3, H, W]

The number of image tokens an image becomes is a property of the model, not computed here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from valora.errors import ModelLoadError
from valora.logger import get_logger
from valora.multimodal.image_io import convert_to_rgb

logger = get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_KNOWN_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                "SiglipImageProcessor", "SiglipImageProcessorFast")


@dataclass(frozen=True)
class ImageProcessor:
    """Preprocessing parameters; defaults are CLIPImageProcessor's own.

    Exactly one of ``shortest_edge`` and ``resize_hw`` is used when ``do_resize``.
    """

    do_convert_rgb: bool = True
    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    crop_hw: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageProcessor:
        """Read ``preprocessor_config.json``, else the ``image_processor`` section of
        ``processor_config.json``."""
        root = Path(directory)
        preprocessor, processor = root / "preprocessor_config.json", root / "processor_config.json"
        if preprocessor.is_file():
            return cls.from_dict(_read_json(preprocessor))
        if processor.is_file():
            section = _read_json(processor).get("image_processor")
            if isinstance(section, dict):
                return cls.from_dict(section)
        raise ModelLoadError(f"no image processor config in {root} (preprocessor_config.json or "
                             f"processor_config.json with an image_processor section)")

    @classmethod
    def from_dict(cls, config: Mapping[str, object]) -> ImageProcessor:
        """Build from a Hugging Face image-processor dict (unknown keys are ignored, unsupported
        sizes refused)."""
        kind = str(config.get("image_processor_type", "CLIPImageProcessor"))
        if kind not in _KNOWN_TYPES:
            logger.warning("image processor type %s treated as CLIP-style resize/crop/normalise",
                           kind)
        shortest_edge, resize_hw = _parse_size(config.get("size", {"shortest_edge": 224}))
        crop = config.get("crop_size", {"height": 224, "width": 224})
        crop_hw = (crop, crop) if isinstance(crop, int) else _height_width(crop, "crop_size")
        defaults = cls()
        return cls(
            do_convert_rgb=bool(config.get("do_convert_rgb", True)),
            do_resize=bool(config.get("do_resize", True)),
            shortest_edge=shortest_edge, resize_hw=resize_hw,
            resample=int(_number(config.get("resample", defaults.resample), "resample")),
            do_center_crop=bool(config.get("do_center_crop", True)), crop_hw=crop_hw,
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=_number(config.get("rescale_factor", 1 / 255), "rescale_factor"),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_triple(config.get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=_triple(config.get("image_std", OPENAI_CLIP_STD), "image_std"),
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one image into a float32 ``[3, H, W]`` tensor (see module docstring)."""
        # The model needs three channels whatever do_convert_rgb says.
        rgb = convert_to_rgb(image)
        if self.do_resize:
            height, width = self.resize_shape(rgb.height, rgb.width)
            rgb = rgb.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(rgb)  # [H, W, 3] uint8
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_hw)
        array = pixels.transpose(2, 0, 1)
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            array = array.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            array = (array - mean) / std
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def resize_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the resize step for an input of that size."""
        if self.resize_hw is not None:
            return self.resize_hw
        assert self.shortest_edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    @property
    def output_shape(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output when fixed by the config, else ``None``."""
        if self.do_center_crop:
            return self.crop_hw
        return self.resize_hw if self.do_resize else None


def _center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Crop ``[H, W, C]`` to ``crop_hw`` around the centre; sides shorter than the crop are
    zero-padded with the image at offset ``ceil((crop - size) / 2)``."""
    for axis, crop in enumerate(crop_hw):
        size = pixels.shape[axis]
        if size >= crop:
            start = (size - crop) // 2
            pixels = pixels.take(range(start, start + crop), axis=axis)
        else:
            shape = list(pixels.shape)
            shape[axis] = crop
            padded = np.zeros(shape, dtype=pixels.dtype)
            offset = math.ceil((crop - size) / 2)
            index = [slice(None)] * pixels.ndim
            index[axis] = slice(offset, offset + size)
            padded[tuple(index)] = pixels
            pixels = padded
    return pixels


def _parse_size(size: object) -> tuple[int | None, tuple[int, int] | None]:
    if isinstance(size, int):  # legacy CLIP configs: an int is the shortest edge
        return size, None
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"]), None
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return None, _height_width(size, "size")
    raise ModelLoadError(f"unsupported image processor size {size!r}; expected "
                         f"{{'shortest_edge': n}} or {{'height': h, 'width': w}}")


def _height_width(value: object, what: str) -> tuple[int, int]:
    if not isinstance(value, dict) or "height" not in value or "width" not in value:
        raise ModelLoadError(f"image processor {what} must have height and width, got {value!r}")
    return int(value["height"]), int(value["width"])


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"image processor {what} must be a number, got {value!r}")
    return float(value)


def _triple(value: object, what: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, int | float) else value
    if not isinstance(values, list | tuple) or len(values) != 3:
        raise ModelLoadError(f"image processor {what} must have 3 values, got {value!r}")
    return _number(values[0], what), _number(values[1], what), _number(values[2], what)


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data
