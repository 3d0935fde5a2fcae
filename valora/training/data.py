"""Examples, loaded sources and the per-task train/validation split.

Every source loader returns a ``LoadedSource``: decoded RGB images with targets, plus how many
items it had to skip (missing or corrupt images, unreadable lines). ``check_bad_fraction`` turns
too many skips into a ``DataError``; below the threshold they are logged with their count.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from valora.heads.result import Box
from valora.logger import get_logger
from valora.training.errors import DataError
from valora.training.spec import SourceSpec, TaskSpec

logger = get_logger(__name__)

Target = str | tuple[Box, ...]
"""A label or answer text, or (detection) the ground-truth boxes of an image."""


@dataclass(frozen=True)
class Example:
    """One image with its target; ``question`` fills ``{question}`` in a VQA task's prompt."""

    image: Image.Image
    target: Target
    question: str | None = None


@dataclass
class LoadedSource:
    """What a source loader produced. ``teacher`` is set for distillation sources (the model
    that labelled the images, kept to measure its accuracy on held-out ground truth)."""

    examples: list[Example]
    num_skipped: int = 0
    num_total: int = 0
    teacher: Any = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TaskData:
    """A task's examples after splitting; ``labels`` is the label set (bounded kinds) in head
    order. ``teacher`` is the distillation teacher, if one of the sources is a teacher."""

    task: TaskSpec
    train: list[Example]
    validation: list[Example]
    labels: tuple[str, ...]
    teacher: Any = None
    num_skipped: int = 0
    validated_on_teacher_labels: bool = False


def open_image(path: Path) -> Image.Image | None:
    """The image at ``path`` as RGB, or ``None`` if it is missing, truncated or not an image."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def check_bad_fraction(name: str, loaded: LoadedSource, max_fraction: float) -> None:
    """Log skipped items; raise ``DataError`` when their share exceeds ``max_fraction``."""
    if loaded.num_skipped == 0:
        return
    total = max(loaded.num_total, 1)
    share = loaded.num_skipped / total
    if share > max_fraction:
        raise DataError(
            f"source {name}: {loaded.num_skipped} of {total} items are missing or corrupt "
            f"({share:.0%} > the allowed {max_fraction:.0%}, training.max_bad_image_fraction)")
    logger.warning("source %s: skipped %d of %d missing or corrupt items", name,
                   loaded.num_skipped, total)


def label_set(task: TaskSpec, examples: list[Example]) -> tuple[str, ...]:
    """The task's labels: ``task.labels`` if given (every target must be among them), else the
    sorted distinct labels of ``examples``. Empty for generative kinds."""
    if not task.bounded:
        return ()
    seen: set[str] = set()
    for ex in examples:
        if isinstance(ex.target, str):
            seen.add(ex.target)
        else:
            seen.update(box.label for box in ex.target)
    if task.labels:
        unknown = sorted(seen - set(task.labels))
        if unknown:
            raise DataError(f"task {task.name}: labels {unknown[:5]} are not in its label set")
        return task.labels
    if task.kind == "classification" and len(seen) < 2:
        raise DataError(
            f"task {task.name}: classification needs at least 2 labels, saw {sorted(seen)}")
    return tuple(sorted(seen))


def _cap_train(train: list[Example], distilled: set[int], max_train: int) -> list[Example]:
    """``train`` with at most ``max_train`` of its ground-truth examples (the first ones, order
    kept); teacher-labelled examples (``id`` in ``distilled``) are all kept."""
    kept, labelled = [], 0
    for ex in train:
        if id(ex) in distilled:
            kept.append(ex)
        elif labelled < max_train:
            kept.append(ex)
            labelled += 1
    return kept


def split_task(task: TaskSpec, parts: list[tuple[SourceSpec, LoadedSource]], seed: int) -> TaskData:
    """Assign examples to train/validation by each source's ``split`` (``both``: a seeded
    ``validation_fraction`` hold-out), then cap both sides by the task's maxima (seeded).

    ``max_train`` caps the ground-truth training examples only: teacher-labelled examples cost
    no annotation and their number is already chosen by the teacher source's pool, so all of
    them train (a larger pool is distillation's way to a better student). Validation is capped
    by ``max_validation`` whatever its origin."""
    rng = random.Random(f"{seed}:split:{task.name}")
    train: list[Example] = []
    validation: list[Example] = []
    distilled: set[int] = set()
    teacher, skipped = None, 0
    for source, loaded in parts:
        skipped += loaded.num_skipped
        teacher = teacher if loaded.teacher is None else loaded.teacher
        items = list(loaded.examples)
        if loaded.teacher is not None:
            distilled.update(id(ex) for ex in items)
        if source.split == "train":
            train += items
        elif source.split == "validation":
            validation += items
        else:
            rng.shuffle(items)
            cut = round(len(items) * task.validation_fraction)
            validation += items[:cut]
            train += items[cut:]
    on_teacher = False
    if not validation and teacher is not None:
        rng.shuffle(train)
        cut = round(len(train) * task.validation_fraction)
        validation, train, on_teacher = train[:cut], train[cut:], True
    if not train or not validation:
        raise DataError(f"task {task.name}: needs training and validation examples, got "
                        f"{len(train)} and {len(validation)} (check its sources' split and limit)")
    rng.shuffle(train)
    rng.shuffle(validation)
    train = _cap_train(train, distilled, task.max_train)
    validation = validation[:task.max_validation]
    if task.hflip:
        mirror = Image.Transpose.FLIP_LEFT_RIGHT
        train += [Example(ex.image.transpose(mirror), ex.target, ex.question)
                  for ex in train if isinstance(ex.target, str)]
    labels = label_set(task, train + validation)
    return TaskData(task, train, validation, labels, teacher, skipped, on_teacher)
