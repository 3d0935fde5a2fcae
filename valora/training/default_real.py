"""Real images bundled with scikit-image and scikit-learn, turned into captioned examples.

- Photos: the scikit-image sample images listed in ``PHOTOS`` (no download needed), each with a
  short label ("What is in the image?") and a caption. There are only a couple of dozen, so every
  example is a random crop / flip / brightness change of one of them, drawn from the seed.
- Handwritten digits: scikit-learn's 8×8 ``load_digits``, upscaled to ``IMAGE_SIZE`` with dark ink
  on a light background. Images whose index is a multiple of ``DIGITS_HOLDOUT_EVERY`` are never
  used for training (they form a held-out split that ``default_eval`` reports on).

Faces (scikit-image ``lfw_subset``) are deliberately left out: adapter generation uses them as a
task the base model must not already know.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from valora.training.scenes import IMAGE_SIZE, QA, Example, ObjectLabel

DIGITS_HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class Photo:
    """A scikit-image sample: loader name, short label and one-sentence caption."""

    loader: str
    label: str
    caption: str


PHOTOS = (
    Photo("astronaut", "an astronaut", "A photo of an astronaut in a white space suit."),
    Photo("camera", "a man with a camera", "A black and white photo of a man with a camera."),
    Photo("chelsea", "a cat", "A photo of a ginger cat."),
    Photo("coffee", "a cup of coffee", "A photo of a cup of coffee on a saucer."),
    Photo("coins", "coins", "A grey photo of many old coins."),
    Photo("rocket", "a rocket", "A photo of a rocket on a launch pad."),
    Photo("horse", "a horse", "A black silhouette of a horse."),
    Photo("clock", "a clock", "A grey photo of a wall clock."),
    Photo("moon", "the moon", "A grey photo of the surface of the moon."),
    Photo("page", "a page of text", "A scanned page of printed text."),
    Photo("brick", "a brick wall", "A grey photo of a brick wall."),
    Photo("grass", "grass", "A grey photo of grass."),
    Photo("gravel", "gravel", "A grey photo of gravel."),
    Photo("checkerboard", "a checkerboard", "A black and white checkerboard."),
    Photo("colorwheel", "a colour wheel", "A colour wheel with every hue."),
    Photo("hubble_deep_field", "galaxies", "A photo of distant galaxies in space."),
    Photo("immunohistochemistry", "stained cells", "A microscope image of stained cells."),
    Photo("retina", "a retina", "A photo of the retina of an eye."),
    Photo("binary_blobs", "white blobs", "White blobs on a black background."),
)


def _to_rgb(array: np.ndarray) -> Image.Image:
    data = np.asarray(array)
    if data.dtype == bool:
        data = data.astype(np.uint8) * 255
    elif data.dtype != np.uint8:
        data = np.clip(data * (255.0 / max(float(data.max()), 1e-6)), 0, 255).astype(np.uint8)
    if data.ndim == 2:
        data = np.stack([data] * 3, axis=-1)
    return Image.fromarray(data[..., :3]).convert("RGB")


@lru_cache(maxsize=1)
def load_photos() -> tuple[Image.Image, ...]:
    """The ``PHOTOS`` as RGB images, shortest side reduced to 160 px (cached, read once)."""
    import skimage.data

    images = []
    for photo in PHOTOS:
        image = _to_rgb(getattr(skimage.data, photo.loader)())
        scale = 160 / min(image.size)
        if scale < 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        images.append(image)
    return tuple(images)


def photo_example(rng: random.Random) -> Example:
    """A random square crop (60–100 % of the short side) of a random photo, maybe mirrored."""
    index = rng.randrange(len(PHOTOS))
    photo, image = PHOTOS[index], load_photos()[index]
    side = round(min(image.size) * rng.uniform(0.6, 1.0))
    left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
    crop = image.crop((left, top, left + side, top + side))
    crop = crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    if rng.random() < 0.5 and photo.loader not in ("page", "rocket", "clock"):
        crop = ImageOps.mirror(crop)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.8, 1.2))
    qas = (
        QA("What is in the image?", photo.label, "photo"),
        QA("Describe the image.", photo.caption, "caption"),
    )
    return Example(crop, qas, "photo")


@lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (N, 8, 8) in 0..16 and labels (N,)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


@lru_cache(maxsize=2)
def digit_indices(train: bool) -> tuple[int, ...]:
    """Indices of the training (or held-out) split of scikit-learn's digits."""
    count = len(load_digits()[1])
    return tuple(i for i in range(count) if (i % DIGITS_HOLDOUT_EVERY == 0) != train)


def handwritten_digit_image(index: int) -> Image.Image:
    """Digit ``index`` as dark ink on white, smoothly upscaled to ``IMAGE_SIZE``."""
    ink = load_digits()[0][index] / 16.0
    grey = (255.0 * (1.0 - ink)).astype(np.uint8)
    return _to_rgb(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)


def handwritten_digit_example(rng: random.Random) -> Example:
    """A training-split handwritten digit with its label and a caption."""
    index = rng.choice(digit_indices(train=True))
    label = int(load_digits()[1][index])
    qas = (
        QA("What digit is shown?", str(label), "digit"),
        QA("Describe the image.", f"A handwritten digit {label}.", "caption"),
    )
    image = handwritten_digit_image(index)
    ink = np.asarray(image.convert("L")) < 128
    ys, xs = np.nonzero(ink)
    centre_x = float(xs.mean()) if len(xs) else IMAGE_SIZE / 2
    centre_y = float(ys.mean()) if len(ys) else IMAGE_SIZE / 2
    label_object = ObjectLabel(f"digit {label}", None, centre_x, centre_y)
    return Example(image, qas, "handwritten", (label_object,), ink.astype(np.uint8))
