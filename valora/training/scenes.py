"""Procedurally generated scenes with captions and question/answer pairs (offline data).

Three scene kinds are rendered with PIL at ``IMAGE_SIZE`` × ``IMAGE_SIZE`` pixels (drawn at 4× and
downsampled, so edges are anti-aliased):

- ``shapes``: 1–4 non-overlapping shapes (circle, square, triangle, star) in distinct-enough
  colours on a light background; questions about colour, shape, count, existence, left/right and
  position, plus a left-to-right caption;
- ``digit``: one digit 0–9 in a random colour, size and place;
- ``word``: one short word from ``WORDS``.

Invariants: a scene is a pure function of its integer seed (same seed → same pixels and same
questions, on any machine with the same Pillow major version); every question asked about a shape
names something unique in the scene, so each answer is unambiguous; left/right questions are only
asked when the two shapes are at least ``MIN_DX`` pixels apart horizontally.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 64
_SCALE = 4
MIN_DX = 12

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 150, 40),
    "blue": (35, 65, 215),
    "yellow": (230, 195, 0),
    "purple": (135, 40, 175),
    "orange": (245, 125, 0),
}
SHAPES = ("circle", "square", "triangle", "star")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = (
    "cat", "dog", "sun", "car", "tree", "fish", "bird", "book", "cup", "star",
    "moon", "home", "cake", "ball", "milk", "rain", "ship", "king", "lamp", "hat",
)
SCENE_KINDS = ("shapes", "digit", "word")


@dataclass(frozen=True)
class QA:
    """One question with its short reference answer; ``kind`` names the question family."""

    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class ObjectLabel:
    """What one drawn object is (a shape name, ``digit N`` or ``word W``), its colour and centre."""

    what: str
    colour: str | None
    x: float
    y: float


@dataclass(frozen=True)
class Example:
    """An image with every question/answer pair generated for it (the caption is one of them).

    ``mask`` (``IMAGE_SIZE``² uint8, when known) holds ``k + 1`` where object ``k`` of ``objects``
    is drawn and 0 elsewhere; training derives dense per-patch targets from it.
    """

    image: Image.Image
    qas: tuple[QA, ...]
    source: str
    objects: tuple[ObjectLabel, ...] = ()
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class SceneObject:
    """A drawn shape: centre (x, y) and radius in output pixels."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def _background(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(225, 255), rng.randint(225, 255), rng.randint(225, 255))


class _Canvas:
    """A 4× RGB drawing and its object-index mask, drawn with the same geometry."""

    def __init__(self, rng: random.Random) -> None:
        size = (IMAGE_SIZE * _SCALE, IMAGE_SIZE * _SCALE)
        self.image = Image.new("RGB", size, _background(rng))
        self.mask = Image.new("L", size, 0)
        self.draw = ImageDraw.Draw(self.image)
        self.mask_draw = ImageDraw.Draw(self.mask)

    def finish(self) -> tuple[Image.Image, np.ndarray]:
        image = self.image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        mask = self.mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
        return image, np.asarray(mask, dtype=np.uint8)


def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    """Vertices (in 4× canvas pixels) of a square, triangle or five-pointed star."""
    cx, cy, r = obj.x * _SCALE, obj.y * _SCALE, obj.radius * _SCALE
    if obj.shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    points = []
    for i in range(10):  # five-pointed star: alternate outer and inner radius
        a = -math.pi / 2 + i * math.pi / 5
        rad = r if i % 2 == 0 else r * 0.45
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return points


def _draw(canvas: _Canvas, obj: SceneObject, index: int, rng: random.Random) -> None:
    fill = _jitter(COLOURS[obj.colour], rng, 15)
    for draw, colour in ((canvas.draw, fill), (canvas.mask_draw, index + 1)):
        if obj.shape == "circle":
            cx, cy, r = obj.x * _SCALE, obj.y * _SCALE, obj.radius * _SCALE
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(obj), fill=colour)


def _place(rng: random.Random, count: int) -> list[tuple[float, float, float]]:
    """Rejection-sample ``count`` non-overlapping discs inside the canvas (restarts on failure)."""
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = rng.uniform(8.0, 12.0)
            x, y = rng.uniform(r + 1, IMAGE_SIZE - r - 1), rng.uniform(r + 1, IMAGE_SIZE - r - 1)
            if all(math.hypot(x - px, y - py) > r + pr + 2 for px, py, pr in placed):
                placed.append((x, y, r))
                if len(placed) == count:
                    return placed


def _describe(obj: SceneObject) -> str:
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _region(obj: SceneObject) -> str:
    vertical = "top" if obj.y < IMAGE_SIZE / 2 else "bottom"
    horizontal = "left" if obj.x < IMAGE_SIZE / 2 else "right"
    return f"{vertical} {horizontal}"


def _shape_questions(objs: list[SceneObject], rng: random.Random) -> list[QA]:
    qas: list[QA] = []
    ordered = sorted(objs, key=lambda o: o.x)
    caption = _join([_describe(o) for o in ordered])
    qas.append(QA("Describe the image.", caption[0].upper() + caption[1:] + ".", "caption"))
    qas.append(QA("How many shapes are there?", str(len(objs)), "count"))
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    colour_counts = {c: sum(o.colour == c for o in objs) for c in COLOURS}
    unique = [o for o in objs if shape_counts[o.shape] == 1]
    for obj in unique:
        qas.append(QA(f"What colour is the {obj.shape}?", obj.colour, "colour"))
        qas.append(QA(f"Where is the {obj.shape}?", _region(obj), "position"))
    for obj in objs:
        if colour_counts[obj.colour] == 1:
            qas.append(QA(f"What shape is {obj.colour}?", obj.shape, "shape"))
    for a in unique:
        for b in unique:
            if a is not b and abs(a.x - b.x) >= MIN_DX:
                side = "left" if a.x < b.x else "right"
                qas.append(QA(f"Is the {a.shape} left or right of the {b.shape}?", side, "left_right"))
    shape = rng.choice(SHAPES)
    qas.append(QA(f"Is there a {shape}?", "yes" if shape_counts[shape] else "no", "exists"))
    shape = rng.choice(SHAPES)
    qas.append(QA(f"How many {shape}s are there?", str(shape_counts[shape]), "count_shape"))
    return qas


def shapes_scene(rng: random.Random) -> Example:
    """1–4 shapes; shape and colour repeats are allowed (questions then avoid the ambiguity)."""
    count = rng.randint(1, 4)
    objs = [
        SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y, r)
        for x, y, r in _place(rng, count)
    ]
    canvas = _Canvas(rng)
    for index, obj in enumerate(objs):
        _draw(canvas, obj, index, rng)
    image, mask = canvas.finish()
    labels = tuple(ObjectLabel(o.shape, o.colour, o.x, o.y) for o in objs)
    return Example(image, tuple(_shape_questions(objs, rng)), "shapes", labels, mask)


def _text_scene(
    rng: random.Random, text: str, what: str, size_range: tuple[int, int]
) -> tuple[Image.Image, str, ObjectLabel, np.ndarray]:
    colour = rng.choice(list(COLOURS))
    canvas = _Canvas(rng)
    font = ImageFont.load_default(size=rng.randint(*size_range) * _SCALE)
    left, top, right, bottom = canvas.draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    span_x = int(max(0, IMAGE_SIZE * _SCALE - width - 4 * _SCALE))
    span_y = int(max(0, IMAGE_SIZE * _SCALE - height - 4 * _SCALE))
    x = 2 * _SCALE + rng.randint(0, span_x) - left
    y = 2 * _SCALE + rng.randint(0, span_y) - top
    canvas.draw.text((x, y), text, font=font, fill=_jitter(COLOURS[colour], rng, 15))
    canvas.mask_draw.text((x, y), text, font=font, fill=1)
    image, mask = canvas.finish()
    centre_x = (x + left + width / 2) / _SCALE
    centre_y = (y + top + height / 2) / _SCALE
    return image, colour, ObjectLabel(what, colour, centre_x, centre_y), mask


def digit_scene(rng: random.Random) -> Example:
    """One printed digit; asks which digit and in what colour."""
    digit = rng.randrange(10)
    image, colour, label, mask = _text_scene(rng, str(digit), f"digit {digit}", (34, 48))
    qas = (
        QA("What digit is shown?", str(digit), "digit"),
        QA("What colour is the digit?", colour, "colour"),
        QA("Describe the image.", f"The digit {digit} written in {colour}.", "caption"),
    )
    return Example(image, qas, "digit", (label,), mask)


def word_scene(rng: random.Random) -> Example:
    """One printed word from ``WORDS``; asks what it says and in what colour."""
    word = rng.choice(WORDS)
    image, colour, label, mask = _text_scene(rng, word, f"word {word}", (18, 24))
    qas = (
        QA("What word is written?", word, "word"),
        QA("What colour is the text?", colour, "colour"),
        QA("Describe the image.", f"The word {word} written in {colour}.", "caption"),
    )
    return Example(image, qas, "word", (label,), mask)


_KIND_WEIGHTS = (("shapes", 0.68), ("digit", 0.22), ("word", 0.10))


def generate_scene(seed: int, kind: str | None = None) -> Example:
    """The scene for ``seed``; ``kind`` forces a scene kind, else it is drawn from the seed."""
    rng = random.Random(f"scene:{seed}")
    if kind is None:
        kind = rng.choices([k for k, _ in _KIND_WEIGHTS], [w for _, w in _KIND_WEIGHTS])[0]
    if kind == "shapes":
        return shapes_scene(rng)
    if kind == "digit":
        return digit_scene(rng)
    if kind == "word":
        return word_scene(rng)
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS}")
