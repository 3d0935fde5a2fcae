"""Distillation's unlabelled pool: a teacher source's ``pool_size`` sets how many images its
teacher labels, and every teacher-labelled example trains (``max_train`` caps ground truth only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from valora.training.data import Example, LoadedSource, split_task
from valora.training.errors import SpecError
from valora.training.pipeline import check_sources
from valora.training.sources import SourceContext, load_source
from valora.training.spec import SourceSpec, TaskSpec, parse_spec
from valora.training.teachers import TEACHER_KINDS, Predictor, Teacher


def _brightness_teacher(options: Any, path: Path | None, name: str) -> Predictor:
    def predict(images: Sequence[Image.Image]) -> list[str]:
        return ["bright" if img.convert("L").getpixel((0, 0)) > 128 else "dark" for img in images]
    return predict


def _teacher_source(pool: Any = None) -> dict[str, Any]:
    source: dict[str, Any] = {
        "teacher": {"kind": "brightness"},
        "images": {"type": "image_folder", "path": "bright", "labelled": False, "limit": 5}}
    if pool is not None:
        source["pool_size"] = pool
    return source


def test_pool_size_sets_how_many_images_the_teacher_labels(
        datasets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TEACHER_KINDS, "brightness", _brightness_teacher)
    ctx = SourceContext(lambda p: datasets / p, 0, "src")
    assert len(load_source("teacher", _teacher_source(), ctx).examples) == 5  # images.limit
    pooled = load_source("teacher", _teacher_source(pool=40), ctx)
    assert len(pooled.examples) == pooled.num_total == 40
    assert {ex.target for ex in pooled.examples} == {"bright", "dark"}
    # A pool larger than a folder yields the whole folder (72 images), never an error.
    assert len(load_source("teacher", _teacher_source(pool=500), ctx).examples) == 72
    for bad in (0, -3, "many", True, 2.5):
        with pytest.raises(SpecError, match="pool_size must be a positive integer"):
            load_source("teacher", _teacher_source(pool=bad), ctx)


def test_bad_pool_size_stops_the_build_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TEACHER_KINDS, "brightness", _brightness_teacher)
    raw = {"tasks": [{"name": "t", "kind": "classification", "prompt": "p", "requirement": 0.5}],
           "sources": [{"task": "t", "type": "teacher", **_teacher_source(pool=0)}]}
    with pytest.raises(SpecError, match=r"sources\[0\].*pool_size must be a positive integer"):
        check_sources(parse_spec(raw, tmp_path))


def _examples(labels: list[str]) -> list[Example]:
    return [Example(Image.new("RGB", (4, 4), (i, 0, 0)), label) for i, label in enumerate(labels)]


def test_max_train_caps_ground_truth_but_keeps_every_teacher_label() -> None:
    task = TaskSpec(name="t", kind="classification", prompt="p", requirement=0.5, max_train=10)
    taught = LoadedSource(_examples(["a", "b"] * 30), teacher=Teacher("t", lambda x: []))
    labelled = LoadedSource(_examples(["a", "b"] * 20))
    truth = LoadedSource(_examples(["a", "b"] * 5))
    parts = [(SourceSpec("t", "teacher", "train"), taught),
             (SourceSpec("t", "image_folder", "train"), labelled),
             (SourceSpec("t", "image_folder", "validation"), truth)]
    data = split_task(task, parts, seed=0)
    taught_ids = {id(ex) for ex in taught.examples}
    assert sum(id(ex) in taught_ids for ex in data.train) == 60  # the whole pool
    assert len(data.train) == 70  # + max_train = 10 of the 40 ground-truth examples
    assert len(data.validation) == 10
    without_teacher = split_task(task, parts[1:], seed=0)
    assert len(without_teacher.train) == 10  # plain labelled data: capped as before


def test_a_larger_pool_keeps_the_smaller_pools_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TEACHER_KINDS, "brightness", _brightness_teacher)
    ctx = SourceContext(lambda p: Path(p), 0, "src")
    images = {"type": "face_scenes", "size": 16, "scene_seed": 1}

    def pool(size: int) -> list[Example]:
        source = {"teacher": {"kind": "brightness"}, "images": images, "pool_size": size}
        return load_source("teacher", source, ctx).examples

    small, large = pool(3), pool(8)
    assert len(small) == 3 and len(large) == 8
    for a, b in zip(small, large, strict=False):
        assert a.image.tobytes() == b.image.tobytes() and a.target == b.target
