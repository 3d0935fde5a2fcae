"""Source loaders (files, built-in datasets), teachers and the train/validation split."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from valora.training.builtin_sources import FASHION_DIR
from valora.training.data import Example, LoadedSource, check_bad_fraction, split_task
from valora.training.errors import DataError, SpecError, TeacherError
from valora.training.sources import SourceContext, load_source
from valora.training.spec import SourceSpec, TaskSpec
from valora.training.teachers import Teacher, build_teacher


def ctx(root: Path = Path("/"), name: str = "src") -> SourceContext:
    return SourceContext(lambda p: root / p, 0, name)


def test_image_folder_counts_corrupt_images(datasets: Path) -> None:
    loaded = load_source("image_folder", {"path": "colours"}, ctx(datasets))
    assert loaded.num_total == 73 and loaded.num_skipped == 1 and len(loaded.examples) == 72
    assert {ex.target for ex in loaded.examples} == {"red", "green", "blue"}
    limited = load_source("image_folder", {"path": "colours", "limit": 10}, ctx(datasets))
    assert limited.num_total == 10
    unlabelled = load_source("image_folder", {"path": "bright", "labelled": False}, ctx(datasets))
    assert len(unlabelled.examples) == 72


def test_jsonl_skips_missing_images_and_bad_lines(datasets: Path, tmp_path: Path) -> None:
    loaded = load_source("jsonl", {"path": "bright.jsonl"}, ctx(datasets))
    assert loaded.num_skipped == 1 and len(loaded.examples) == 72
    assert loaded.examples[0].question == "Is it bright?"
    text = (datasets / "bright.jsonl").read_text() + "{broken\n" + json.dumps({"image": 3}) + "\n"
    (tmp_path / "b.jsonl").write_text(text.replace('"bright/', f'"{datasets}/bright/'))
    bad = load_source("jsonl", {"path": "b.jsonl"}, ctx(tmp_path))
    assert bad.num_skipped == 3 and len(bad.examples) == 72


def test_bad_fraction_threshold() -> None:
    loaded = LoadedSource([], num_skipped=3, num_total=20)
    check_bad_fraction("s", loaded, 0.2)
    with pytest.raises(DataError, match="3 of 20 items are missing or corrupt"):
        check_bad_fraction("s", loaded, 0.1)


def test_coco_boxes_are_normalised(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (40, 20)).save(tmp_path / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 20}
                       for i in range(4)],  # image 3 is missing on disk
            "annotations": [{"image_id": 0, "bbox": [10, 5, 20, 10], "category_id": 7},
                            {"image_id": 1, "bbox": [0, 0, 4, 2], "category_id": 8}],
            "categories": [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    loaded = load_source("coco", {"path": "coco.json"}, ctx(tmp_path))
    assert loaded.num_skipped == 1 and len(loaded.examples) == 3
    boxes = {len(ex.target): ex.target for ex in loaded.examples}
    cats = [b for ex in loaded.examples for b in ex.target  # type: ignore[union-attr]
            if b.label == "cat"]
    (box,) = cats
    assert (box.cx, box.cy, box.w, box.h) == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert 0 in boxes  # image 2 has no objects
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not COCO"):
        load_source("coco", {"path": "bad.json"}, ctx(tmp_path))


def test_missing_paths_and_unknown_types(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_source("image_folder", {"path": "nope"}, ctx(tmp_path))
    with pytest.raises(SpecError, match="'path' is required"):
        load_source("jsonl", {}, ctx(tmp_path))
    with pytest.raises(SpecError, match="unknown source type"):
        load_source("hdf5", {}, ctx(tmp_path))


def test_digits_split_by_index_rule() -> None:
    held_out = load_source("sklearn_digits", {"every": [5, 0]}, ctx())
    rest = load_source("sklearn_digits", {"not_every": [5, 0]}, ctx())
    assert len(held_out.examples) == 360 and len(rest.examples) == 1437
    assert {ex.target for ex in held_out.examples} == {str(d) for d in range(10)}
    corner = np.asarray(held_out.examples[0].image)[0, 0]
    assert corner.min() > 200  # dark ink on light paper by default
    named = load_source("sklearn_digits", {"limit": 5, "label_names": list("abcdefghij")}, ctx())
    assert all(ex.target in "abcdefghij" for ex in named.examples)
    with pytest.raises(SpecError, match="label_names needs 10"):
        load_source("sklearn_digits", {"label_names": ["x"]}, ctx())


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist() -> None:
    loaded = load_source("fashion_mnist", {"part": "t10k", "limit": 300}, ctx())
    assert len(loaded.examples) == 300 and loaded.examples[0].image.size == (28, 28)
    assert len({ex.target for ex in loaded.examples}) == 10


def test_fashion_mnist_missing_files_are_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion_mnist", {"path": str(tmp_path)}, ctx())


def test_lfw_and_face_scenes() -> None:
    lfw = load_source("lfw_faces", {}, ctx())
    assert len(lfw.examples) == 200
    assert sum(ex.target == "face" for ex in lfw.examples) == 100
    scenes = load_source("face_scenes", {"limit": 40, "patch_range": [0, 10]}, ctx())
    again = load_source("face_scenes", {"limit": 40, "patch_range": [0, 10]}, ctx())
    assert [ex.target for ex in scenes.examples] == [ex.target for ex in again.examples]
    assert np.array_equal(np.asarray(scenes.examples[3].image), np.asarray(again.examples[3].image))
    assert 10 < sum(ex.target == "face" for ex in scenes.examples) < 30


def test_haar_teacher_recognises_lfw_faces() -> None:
    teacher = build_teacher({"kind": "opencv_haar", "upscale": 4, "min_neighbors": 3}, ctx())
    lfw = load_source("lfw_faces", {}, ctx())
    labels = teacher.label([ex.image for ex in lfw.examples])
    accuracy = np.mean([p == ex.target for p, ex in zip(labels, lfw.examples, strict=True)])
    assert accuracy > 0.85


def test_sklearn_teacher_and_its_failure(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    model = LogisticRegression(max_iter=500).fit(data.data[:1000], data.target[:1000])
    (tmp_path / "digits.pkl").write_bytes(pickle.dumps(model))
    options = {"kind": "sklearn", "path": "digits.pkl", "size": [8, 8], "grayscale": True,
               "scale": 16.0, "labels": [str(d) for d in range(10)]}
    teacher = build_teacher(options, ctx(tmp_path))
    images = load_source("sklearn_digits", {"ink": "light", "every": [5, 0]}, ctx())
    labels = teacher.label([ex.image for ex in images.examples])
    accuracy = np.mean([p == ex.target for p, ex in zip(labels, images.examples, strict=True)])
    assert accuracy > 0.85
    wrong_input = build_teacher({**options, "size": [16, 16]}, ctx(tmp_path))
    with pytest.raises(TeacherError, match=r"failed on images 0\.\.63: ValueError"):
        wrong_input.label([ex.image for ex in images.examples])
    (tmp_path / "junk.pkl").write_bytes(pickle.dumps({"not": "a model"}))
    with pytest.raises(TeacherError, match="not an estimator"):
        build_teacher({**options, "path": "junk.pkl"}, ctx(tmp_path))


def test_torchscript_teacher(tmp_path: Path) -> None:
    class Brightness(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = x.mean(dim=(1, 2, 3))
            return torch.stack([mean, 1 - mean], dim=1)

    batch = torch.export.Dim("batch")
    program = torch.export.export(Brightness(), (torch.rand(2, 3, 4, 4),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(tmp_path / "t.pt2"))
    teacher = build_teacher({"kind": "torch", "path": "t.pt2", "size": [4, 4],
                             "labels": ["light", "dark"]}, ctx(tmp_path))
    images = [Image.new("RGB", (8, 8), (250, 250, 250)), Image.new("RGB", (8, 8), (5, 5, 5))] * 2
    assert teacher.label(images) == ["light", "dark", "light", "dark"]
    (tmp_path / "broken.pt2").write_bytes(b"zip?")
    with pytest.raises(TeacherError, match="cannot load"):
        build_teacher({"kind": "torch", "path": "broken.pt2"}, ctx(tmp_path))


def test_teacher_errors(tmp_path: Path) -> None:
    with pytest.raises(TeacherError, match="does not exist"):
        build_teacher({"kind": "sklearn", "path": "none.pkl"}, ctx(tmp_path))
    (tmp_path / "bad.xml").write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(TeacherError, match="not a readable OpenCV cascade"):
        build_teacher({"kind": "opencv_haar", "path": "bad.xml"}, ctx(tmp_path))
    short = Teacher("short", lambda images: ["x"])
    with pytest.raises(TeacherError, match="returned 1 labels for 2 images"):
        short.label([Image.new("RGB", (2, 2))] * 2)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        (tmp_path / "m.onnx").write_bytes(b"")
        with pytest.raises(TeacherError, match="pip install onnxruntime"):
            build_teacher({"kind": "onnx", "path": "m.onnx"}, ctx(tmp_path))


def _examples(labels: list[str]) -> list[Example]:
    return [Example(Image.new("RGB", (4, 4), (i, 0, 0)), label) for i, label in enumerate(labels)]


def test_split_keeps_teacher_labels_out_of_validation() -> None:
    task = TaskSpec(name="t", kind="classification", prompt="p", requirement=0.5, hflip=True)
    truth = LoadedSource(_examples(["a", "b"] * 10))
    taught = LoadedSource(_examples(["a", "b"] * 30), teacher=Teacher("t", lambda x: []))
    data = split_task(task, [(SourceSpec("t", "teacher", "train"), taught),
                             (SourceSpec("t", "image_folder", "validation"), truth)], seed=0)
    assert len(data.validation) == 20 and not data.validated_on_teacher_labels
    assert len(data.train) == 120  # 60 taught + their mirrored copies
    assert data.labels == ("a", "b") and data.teacher is not None
    both = split_task(task, [(SourceSpec("t", "image_folder", "both"), truth)], seed=0)
    assert len(both.validation) == 4 and len(both.train) == 32
    with pytest.raises(DataError, match="at least 2 labels"):
        split_task(task, [(SourceSpec("t", "x", "both"), LoadedSource(_examples(["a"] * 10)))], 0)
