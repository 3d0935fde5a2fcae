"""Load every task's sources into a train/validation split, and measure teachers on held-out data.

Checks that need no data run first (``check_sources``: unknown source types and teacher kinds
abort the build before any work). A task whose data cannot be loaded (``DataError``) or whose
teacher fails (``TeacherError``) is reported as failed; the other tasks carry on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from valora.logger import get_logger
from valora.training.data import LoadedSource, TaskData, check_bad_fraction, split_task
from valora.training.errors import DataError, SpecError
from valora.training.sources import LOADERS, SourceContext, load_source
from valora.training.spec import BuildSpec, SourceSpec, TaskSpec

logger = get_logger(__name__)


def _source_name(spec: BuildSpec, source: SourceSpec) -> str:
    index = spec.sources.index(source)
    return f"sources[{index}] ({source.type} → {source.task})"


def check_sources(spec: BuildSpec) -> None:
    """Raise ``SpecError`` for unknown source types, teacher kinds or a bad teacher ``pool_size``
    (before loading anything)."""
    import valora.training.builtin_sources  # noqa: F401  (registers the built-in loaders)
    from valora.training.teachers import TEACHER_KINDS, pool_size

    def check(kind: str, options: Mapping[str, Any], name: str) -> None:
        if kind not in LOADERS:
            raise SpecError(f"{name}: unknown source type {kind!r}; known: {sorted(LOADERS)}")
        if kind == "teacher":
            teacher, images = options.get("teacher"), options.get("images")
            if not isinstance(teacher, Mapping) or not isinstance(images, Mapping):
                raise SpecError(f"{name}: a teacher source needs 'teacher' and 'images' tables")
            if teacher.get("kind") not in TEACHER_KINDS:
                raise SpecError(f"{name}: unknown teacher kind {teacher.get('kind')!r}; "
                                f"known: {sorted(TEACHER_KINDS)}")
            if "pool_size" in options:
                pool_size(options["pool_size"], name)
            check(str(images.get("type", "")), images, f"{name}.images")

    for source in spec.sources:
        check(source.type, source.options, _source_name(spec, source))
    for task in spec.tasks:
        kinds = {s.type for s in spec.sources_of(task.name)}
        if task.kind == "detection" and kinds - {"coco", "teacher"}:
            raise SpecError(f"task {task.name}: detection tasks take coco (or teacher) sources, "
                            f"got {sorted(kinds)}")


def load_task(spec: BuildSpec, task: TaskSpec) -> TaskData:
    """Load, check and split one task's sources (``DataError``/``TeacherError`` on failure)."""
    parts: list[tuple[SourceSpec, LoadedSource]] = []
    for source in spec.sources_of(task.name):
        name = _source_name(spec, source)
        options = dict(source.options)
        if source.type == "teacher" and source.split == "both":
            # Teacher labels are for training; validation must be ground truth when any exists.
            source = SourceSpec(source.task, source.type, "train", source.options)
        loaded = load_source(source.type, options, SourceContext(spec.resolve, spec.seed, name))
        check_bad_fraction(name, loaded, spec.training.max_bad_image_fraction)
        if not loaded.examples:
            raise DataError(f"{name}: produced no usable examples")
        parts.append((source, loaded))
    data = split_task(task, parts, spec.seed)
    logger.info("task %s: %d train, %d validation examples, %d labels", task.name,
                len(data.train), len(data.validation), len(data.labels))
    return data


def teacher_accuracy(data: TaskData) -> float | None:
    """The teacher's exact-match accuracy on the task's ground-truth validation split (``None``
    without a teacher, or when validation itself comes from teacher labels)."""
    if data.teacher is None or data.validated_on_teacher_labels:
        return None
    images = [ex.image for ex in data.validation]
    predicted = data.teacher.label(images, progress=f"teacher on {data.task.name} validation")
    truth = [ex.target for ex in data.validation]
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / max(len(truth), 1)
