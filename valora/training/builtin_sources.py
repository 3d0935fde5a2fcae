"""Built-in offline datasets: scikit-learn digits, Fashion-MNIST (Debian package
``dataset-fashion-mnist``), scikit-image ``lfw_subset`` faces vs non-faces, and ``face_scenes``
(lfw patches pasted onto scikit-image photos, for the face-detector distillation task).

Options (all optional): ``limit``; ``label_names`` (the label of each class index: digits
0-9, Fashion-MNIST's 10 classes, or [face, non-face] — default ``["0", ..., "9"]``, the
lower-case Fashion-MNIST names, ``["face", "no face"]``).
``sklearn_digits``: ``every`` [n, r] keeps images whose index i has ``i % n == r``, ``not_every``
[n, r] drops them (to split on the same indices as another model's training data); ``ink``
``dark`` (default: dark ink on light paper, as scikit-learn's gallery shows them) or ``light``.
``fashion_mnist``: ``path`` (folder of the idx ``.gz`` files, default ``$VALORA_FASHION_MNIST_DIR``
or else ``/usr/share/datasets/fashion-mnist``), ``part`` (``train`` or ``t10k``).
``face_scenes``: ``size`` (canvas pixels, 48), ``patch_range`` ([first, end) index range of the
100 lfw faces and 100 non-faces to paste, default [0, 100]), ``patch_scale`` (side of the pasted
patch as a fraction of the canvas, [low, high], default [0.45, 0.7]), ``scene_seed``.
"""

from __future__ import annotations

import gzip
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from valora.training.data import Example, LoadedSource
from valora.training.errors import DataError, SpecError
from valora.training.sources import SourceContext, apply_limit, register

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                 "bag", "ankle boot")
FASHION_DIR = Path(os.environ.get("VALORA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FACE, NO_FACE = "face", "no face"
# scikit-image photos without faces, used as scene backgrounds.
BACKGROUNDS = ("brick", "grass", "gravel", "coffee", "chelsea", "rocket", "coins", "moon", "page",
               "text", "hubble_deep_field", "horse", "cell", "immunohistochemistry")


def label_names(options: Mapping[str, Any], default: tuple[str, ...],
                ctx: SourceContext) -> tuple[str, ...]:
    names = tuple(str(v) for v in options.get("label_names", default))
    if len(names) != len(default) or len(set(names)) != len(names):
        raise SpecError(f"source {ctx.name}: label_names needs {len(default)} distinct names, "
                        f"got {list(names)}")
    return names


def _index_filter(options: Mapping[str, Any], ctx: SourceContext) -> tuple[int, int, bool] | None:
    for key, keep in (("every", True), ("not_every", False)):
        if key in options:
            modulus, remainder = (int(v) for v in options[key])
            if modulus <= 0:
                raise SpecError(f"source {ctx.name}: {key} needs a positive modulus")
            return modulus, remainder, keep
    return None


def gray_to_rgb(pixels: np.ndarray) -> Image.Image:
    """A ``[h, w]`` array scaled to ``[0, 1]`` → RGB PIL image."""
    gray = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


@register("sklearn_digits")
def load_digits(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    names = label_names(options, DIGIT_NAMES, ctx)
    rule = _index_filter(options, ctx)
    dark = str(options.get("ink", "dark")) == "dark"
    items = [((1.0 - img / 16.0) if dark else img / 16.0, names[int(t)])
             for i, (img, t) in enumerate(zip(data.images, data.target, strict=True))
             if rule is None or (i % rule[0] == rule[1]) == rule[2]]
    chosen = apply_limit(items, options, ctx)
    return LoadedSource([Example(gray_to_rgb(img), label) for img, label in chosen],
                        num_total=len(chosen))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@register("fashion_mnist")
def load_fashion_mnist(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    root = ctx.resolve(str(options["path"])) if "path" in options else FASHION_DIR
    part = str(options.get("part", "train"))
    if part not in ("train", "t10k"):
        raise SpecError(f"source {ctx.name}: part must be 'train' or 't10k', got {part!r}")
    images_path = root / f"{part}-images-idx3-ubyte.gz"
    labels_path = root / f"{part}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DataError(f"source {ctx.name}: Fashion-MNIST not found under {root}; install it with "
                        "`apt-get install dataset-fashion-mnist` or set the source's path")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    names = label_names(options, FASHION_NAMES, ctx)
    chosen = apply_limit(list(range(len(labels))), options, ctx)
    return LoadedSource([Example(gray_to_rgb(images[i] / 255.0), names[int(labels[i])])
                         for i in chosen], num_total=len(chosen))


def _lfw() -> np.ndarray:
    from skimage.data import lfw_subset

    return np.asarray(lfw_subset())  # [200, 25, 25]: 100 faces then 100 non-faces


@register("lfw_faces")
def load_lfw_faces(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    patches = _lfw()
    face, no_face = label_names(options, (FACE, NO_FACE), ctx)
    items = [(patches[i], face if i < 100 else no_face) for i in range(len(patches))]
    chosen = apply_limit(items, options, ctx)
    return LoadedSource([Example(gray_to_rgb(img), label) for img, label in chosen],
                        num_total=len(chosen))


def _backgrounds(size: int) -> list[np.ndarray]:
    import skimage.data as skdata

    out = []
    for name in BACKGROUNDS:
        img = np.asarray(getattr(skdata, name)(), dtype=np.float64)
        img = img / 255.0 if img.max() > 1.0 else img
        gray = img.mean(axis=2) if img.ndim == 3 else img
        out.append(gray[: max(size, gray.shape[0]), : max(size, gray.shape[1])])
    return out


def _scene(rng: random.Random, backgrounds: list[np.ndarray], patch: np.ndarray,
           size: int, scale: tuple[float, float]) -> Image.Image:
    bg = backgrounds[rng.randrange(len(backgrounds))]
    crop = rng.randint(size, min(bg.shape) // 2)
    y, x = rng.randrange(bg.shape[0] - crop + 1), rng.randrange(bg.shape[1] - crop + 1)
    bilinear = Image.Resampling.BILINEAR
    background = gray_to_rgb(bg[y:y + crop, x:x + crop]).resize((size, size), bilinear)
    canvas = np.asarray(background)
    side = rng.randint(int(size * scale[0]), int(size * scale[1]))
    tile = np.asarray(gray_to_rgb(patch).resize((side, side), bilinear))
    top, left = rng.randrange(size - side + 1), rng.randrange(size - side + 1)
    canvas = canvas.copy()
    canvas[top:top + side, left:left + side] = tile
    return Image.fromarray(canvas)


@register("face_scenes")
def load_face_scenes(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    """Scenes with one pasted lfw patch: a face (label ``face``) or a non-face (``no face``)."""
    size = int(options.get("size", 48))
    first, end = (int(v) for v in options.get("patch_range", [0, 100]))
    low, high = (float(v) for v in options.get("patch_scale", [0.45, 0.7]))
    if not 0 <= first < end <= 100 or size < 16 or not 0.1 <= low <= high <= 1.0:
        raise SpecError(f"source {ctx.name}: patch_range must lie in [0, 100], size >= 16 and "
                        "0.1 <= patch_scale low <= high <= 1")
    count = int(options.get("limit", 400))
    face, no_face = label_names(options, (FACE, NO_FACE), ctx)
    rng = random.Random(f"{options.get('scene_seed', ctx.seed)}:{ctx.name}")
    patches, backgrounds = _lfw(), _backgrounds(size)
    examples = []
    for _ in range(count):
        is_face = rng.random() < 0.5
        index = rng.randrange(first, end) + (0 if is_face else 100)
        scene = _scene(rng, backgrounds, patches[index], size, (low, high))
        examples.append(Example(scene, face if is_face else no_face))
    return LoadedSource(examples, num_total=count)
