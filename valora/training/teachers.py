"""Teacher models that label unlabelled images (distillation), and the ``teacher`` source type.

A source ``{type = "teacher", teacher = {...}, images = {...}}`` loads the images of the nested
``images`` source (any source type; its labels are ignored), labels them with the teacher and
yields them as training examples. ``pool_size`` (optional, a positive integer) is how many
unlabelled images the teacher labels: it is passed to the ``images`` source as its ``limit``
(a generator such as ``face_scenes`` renders that many; a folder yields at most that many).
Teacher labels cost no annotation, so a distilled task's training set is as large as this pool:
``split_task`` does not cap teacher-labelled examples by the task's ``max_train``.
Teacher kinds (``teacher.kind``):

- ``opencv_haar``: an OpenCV cascade (``path``, default ``haarcascade_frontalface_default.xml``
  from ``cv2.data.haarcascades``); label ``positive`` (default ``face``) when it finds an object,
  else ``negative`` (``no face``). Options ``upscale`` (3), ``scale_factor`` (1.05),
  ``min_neighbors`` (5).
- ``sklearn``: a pickled / joblib estimator with ``predict``; input ``size`` [w, h], ``grayscale``,
  ``scale`` (pixels in [0, 1] times this), flattened.
- ``torch``: a ``torch.export`` program (``.pt2``, exported with a dynamic batch dimension), a
  TorchScript file, or a pickled module, mapping ``[n, c, h, w]`` floats in [0, 1] to logits;
  ``size``, ``grayscale``.
- ``onnx``: an ONNX model run with onnxruntime (only if it is installed); same input options.

For ``sklearn``/``torch``/``onnx``, ``labels`` names the output classes in index order.
Any failure while loading or labelling is a ``TeacherError`` naming the teacher.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from valora.training.data import Example, LoadedSource
from valora.training.errors import SpecError, TeacherError
from valora.training.sources import SourceContext, load_source, register

Predictor = Callable[[Sequence[Image.Image]], list[str]]


@dataclass
class Teacher:
    """A named labelling function over batches of RGB images."""

    name: str
    predict: Predictor

    def label(self, images: Sequence[Image.Image], batch_size: int = 64,
              progress: str | None = None) -> list[str]:
        out: list[str] = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            chunk = images[start:start + batch_size]
            try:
                labels = self.predict(chunk)
            except Exception as exc:  # a user's model may raise anything
                last = start + len(chunk) - 1
                raise TeacherError(f"teacher {self.name} failed on images {start}..{last}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            if len(labels) != len(chunk):
                raise TeacherError(f"teacher {self.name} returned {len(labels)} labels for "
                                   f"{len(chunk)} images")
            out += [str(label) for label in labels]
        return out


def _array(images: Sequence[Image.Image], options: Mapping[str, Any]) -> np.ndarray:
    """``[n, c, h, w]`` float32 in ``[0, 1]`` (``c`` = 1 when ``grayscale``)."""
    w, h = (int(v) for v in options.get("size", [32, 32]))
    mode = "L" if options.get("grayscale", False) else "RGB"
    resized = [img.convert(mode).resize((w, h), Image.Resampling.BILINEAR) for img in images]
    arr = np.stack([np.asarray(img, dtype=np.float32) for img in resized]) / 255.0
    return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)


def _class_names(options: Mapping[str, Any], name: str) -> Callable[[Any], str]:
    labels = options.get("labels")
    if labels is None:
        return str
    names = [str(v) for v in labels]

    def lookup(value: Any) -> str:
        if isinstance(value, str):
            return value
        index = int(value)
        if not 0 <= index < len(names):
            raise TeacherError(f"teacher {name} predicted class {index}; labels has {len(names)}")
        return names[index]
    return lookup


def _haar(options: Mapping[str, Any], path: Path | None, name: str) -> Predictor:
    import cv2

    file = path or Path(cv2.__file__).parent / "data" / "haarcascade_frontalface_default.xml"
    try:
        cascade = cv2.CascadeClassifier(str(file))
    except Exception as exc:  # OpenCV reports parse errors as SystemError/cv2.error
        raise TeacherError(f"teacher {name}: {file} is not a readable OpenCV cascade") from exc
    if cascade.empty():
        raise TeacherError(f"teacher {name}: {file} is not a readable OpenCV cascade")
    upscale = float(options.get("upscale", 3))
    scale_factor = float(options.get("scale_factor", 1.05))
    neighbours = int(options.get("min_neighbors", 5))
    positive = str(options.get("positive", "face"))
    negative = str(options.get("negative", "no face"))

    def predict(images: Sequence[Image.Image]) -> list[str]:
        out = []
        for img in images:
            gray = np.asarray(img.convert("L"))
            size = (int(gray.shape[1] * upscale), int(gray.shape[0] * upscale))
            found = cascade.detectMultiScale(cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC),
                                             scaleFactor=scale_factor, minNeighbors=neighbours)
            out.append(positive if len(found) else negative)
        return out
    return predict


def _sklearn(options: Mapping[str, Any], path: Path | None, name: str) -> Predictor:
    if path is None:
        raise SpecError(f"teacher {name}: 'path' to the pickled estimator is required")
    try:
        if path.suffix == ".joblib":
            import joblib

            model = joblib.load(path)
        else:
            with path.open("rb") as f:
                model = pickle.load(f)
    except Exception as exc:
        raise TeacherError(f"teacher {name}: cannot load {path}: {exc}") from exc
    if not hasattr(model, "predict"):
        raise TeacherError(
            f"teacher {name}: {path} holds a {type(model).__name__}, not an estimator")
    scale, lookup = float(options.get("scale", 1.0)), _class_names(options, name)

    def predict(images: Sequence[Image.Image]) -> list[str]:
        features = _array(images, options).reshape(len(images), -1) * scale
        return [lookup(v) for v in model.predict(features)]
    return predict


def _torch(options: Mapping[str, Any], path: Path | None, name: str) -> Predictor:
    import torch

    if path is None:
        raise SpecError(f"teacher {name}: 'path' to the TorchScript model is required")
    try:
        if path.suffix == ".pt2":
            model = torch.export.load(str(path)).module()
        else:
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError:
                model = torch.load(str(path), map_location="cpu", weights_only=False)
            model.eval()
    except Exception as exc:
        raise TeacherError(f"teacher {name}: cannot load {path}: {exc}") from exc
    lookup = _class_names(options, name)

    def predict(images: Sequence[Image.Image]) -> list[str]:
        with torch.no_grad():
            logits = model(torch.from_numpy(_array(images, options)))
        return [lookup(i) for i in logits.argmax(dim=-1).tolist()]
    return predict


def _onnx(options: Mapping[str, Any], path: Path | None, name: str) -> Predictor:
    try:
        import onnxruntime
    except ImportError as exc:
        raise TeacherError(f"teacher {name}: ONNX teachers need onnxruntime "
                           "(pip install onnxruntime)") from exc
    if path is None:
        raise SpecError(f"teacher {name}: 'path' to the .onnx model is required")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TeacherError(f"teacher {name}: cannot load {path}: {exc}") from exc
    input_name, lookup = session.get_inputs()[0].name, _class_names(options, name)

    def predict(images: Sequence[Image.Image]) -> list[str]:
        logits = session.run(None, {input_name: _array(images, options)})[0]
        return [lookup(i) for i in np.asarray(logits).argmax(axis=-1).tolist()]
    return predict


TEACHER_KINDS: dict[str, Callable[[Mapping[str, Any], Path | None, str], Predictor]] = {
    "opencv_haar": _haar, "sklearn": _sklearn, "torch": _torch, "onnx": _onnx,
}


def build_teacher(options: Mapping[str, Any], ctx: SourceContext) -> Teacher:
    kind = str(options.get("kind", ""))
    factory = TEACHER_KINDS.get(kind)
    if factory is None:
        raise SpecError(f"source {ctx.name}: unknown teacher kind {kind!r}; "
                        f"known: {sorted(TEACHER_KINDS)}")
    path = ctx.resolve(str(options["path"])) if "path" in options else None
    if path is not None and not path.exists():
        raise TeacherError(f"teacher {kind} of source {ctx.name}: {path} does not exist")
    return Teacher(f"{kind}({path.name if path else 'default'})", factory(options, path, ctx.name))


def pool_size(value: Any, source: str) -> int:
    """A teacher source's ``pool_size``: a positive integer (``SpecError`` naming ``source``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{source}: pool_size must be a positive integer, got {value!r}")
    return value


@register("teacher")
def load_teacher_source(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    teacher_opts, image_opts = options.get("teacher"), options.get("images")
    if not isinstance(teacher_opts, Mapping) or not isinstance(image_opts, Mapping):
        raise SpecError(f"source {ctx.name}: a teacher source needs 'teacher' and 'images' tables")
    teacher = build_teacher(teacher_opts, ctx)
    inner = {k: v for k, v in image_opts.items() if k != "type"}
    if "pool_size" in options:
        inner["limit"] = pool_size(options["pool_size"], f"source {ctx.name}")
    unlabelled = load_source(str(image_opts.get("type", "")), inner,
                             SourceContext(ctx.resolve, ctx.seed, f"{ctx.name}.images"))
    images = [ex.image for ex in unlabelled.examples]
    labels = teacher.label(images, progress=f"teacher {teacher.name}")
    return LoadedSource([Example(img, label) for img, label in zip(images, labels, strict=True)],
                        num_skipped=unlabelled.num_skipped, num_total=unlabelled.num_total,
                        teacher=teacher)
