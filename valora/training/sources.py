"""Loaders of labelled dataset files: image folders, JSONL (image + question + answer) and COCO
detection JSON; plus the registry every source ``type`` is looked up in.

- ``image_folder``: ``path/<label>/<image>``; the folder name is the label (``label_map``
  renames). With ``labelled = false``: every image below ``path``, unlabelled (for teachers).
- ``jsonl``: one object per line, ``{"image": "a.png", "question": "...", "answer": "..."}``
  (``label`` or ``caption`` are accepted for ``answer``); image paths relative to the file.
- ``coco``: ``{"images": [{"id", "file_name", "width", "height"}], "annotations": [{"image_id",
  "bbox": [x, y, w, h], "category_id"}], "categories": [{"id", "name"}]}``; images under
  ``image_root`` (default: the JSON's folder). Boxes become normalised ``(cx, cy, w, h)``.

Common options: ``path``, ``limit`` (keep the first N after a seeded shuffle).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valora.heads.result import Box
from valora.training.data import Example, LoadedSource, open_image
from valora.training.errors import DataError, SpecError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class SourceContext:
    """What a loader may use besides its options: path resolution and the build's seed."""

    resolve: Callable[[str], Path]
    seed: int
    name: str


Loader = Callable[[Mapping[str, Any], SourceContext], LoadedSource]
LOADERS: dict[str, Loader] = {}


def register(kind: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        LOADERS[kind] = fn
        return fn
    return wrap


def required_path(options: Mapping[str, Any], ctx: SourceContext) -> Path:
    if "path" not in options:
        raise SpecError(f"source {ctx.name}: 'path' is required")
    path = ctx.resolve(str(options["path"]))
    if not path.exists():
        raise DataError(f"source {ctx.name}: {path} does not exist")
    return path


def apply_limit(items: list[Any], options: Mapping[str, Any], ctx: SourceContext) -> list[Any]:
    """A seeded shuffle, then the first ``limit`` items (all when no limit is set)."""
    items = list(items)
    random.Random(f"{ctx.seed}:{ctx.name}").shuffle(items)
    limit = options.get("limit")
    return items[:int(limit)] if limit is not None else items


@register("image_folder")
def load_image_folder(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    root = required_path(options, ctx)
    labelled = bool(options.get("labelled", True))
    label_map: Mapping[str, str] = options.get("label_map", {})
    files: list[tuple[Path, str]] = []
    if labelled:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            label = label_map.get(folder.name, folder.name)
            files += [(f, label) for f in sorted(folder.iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, "") for f in sorted(root.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"source {ctx.name}: no images under {root}")
    out = LoadedSource([], num_total=0)
    for path, label in apply_limit(files, options, ctx):
        out.num_total += 1
        image = open_image(path)
        if image is None:
            out.num_skipped += 1
        else:
            out.examples.append(Example(image, label))
    return out


@register("jsonl")
def load_jsonl(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    path = required_path(options, ctx)
    records: list[tuple[int, Any]] = []
    out = LoadedSource([], num_total=0)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError:
            out.num_total += 1
            out.num_skipped += 1
            out.notes.append(f"line {number}: not JSON")
    for number, record in apply_limit(records, options, ctx):
        out.num_total += 1
        answer = record.get("answer", record.get("label", record.get("caption"))) \
            if isinstance(record, dict) else None
        if not isinstance(answer, str) or not isinstance(record.get("image"), str):
            out.num_skipped += 1
            out.notes.append(f"line {number}: needs 'image' and 'answer' strings")
            continue
        image = open_image(path.parent / record["image"])
        if image is None:
            out.num_skipped += 1
            continue
        question = record.get("question")
        out.examples.append(Example(image, answer, question if isinstance(question, str) else None))
    return out


def _coco_boxes(annotations: list[dict[str, Any]], names: Mapping[int, str], width: float,
                height: float) -> tuple[Box, ...]:
    boxes = []
    for ann in annotations:
        x, y, w, h = (float(v) for v in ann["bbox"])
        cx, cy = (x + w / 2) / width, (y + h / 2) / height
        boxes.append(Box(names[int(ann["category_id"])], 1.0, min(max(cx, 0.0), 1.0),
                         min(max(cy, 0.0), 1.0), min(w / width, 1.0), min(h / height, 1.0)))
    return tuple(boxes)


@register("coco")
def load_coco(options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    path = required_path(options, ctx)
    try:
        coco = json.loads(path.read_text())
        names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        images = list(coco["images"])
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in coco.get("annotations", []):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"source {ctx.name}: {path} is not COCO detection JSON ({exc})") from exc
    root = ctx.resolve(str(options["image_root"])) if "image_root" in options else path.parent
    out = LoadedSource([], num_total=0)
    for info in apply_limit(images, options, ctx):
        out.num_total += 1
        image = open_image(root / str(info.get("file_name", "")))
        if image is None:
            out.num_skipped += 1
            continue
        width = float(info.get("width") or image.width)
        height = float(info.get("height") or image.height)
        try:
            boxes = _coco_boxes(by_image.get(int(info["id"]), []), names, width, height)
        except (KeyError, TypeError, ValueError):
            out.num_skipped += 1
            continue
        out.examples.append(Example(image, boxes))
    return out


def load_source(kind: str, options: Mapping[str, Any], ctx: SourceContext) -> LoadedSource:
    """Dispatch to the loader registered for ``kind`` (``SpecError`` for unknown kinds)."""
    # Importing registers the built-in datasets and the teacher source.
    import valora.training.builtin_sources
    import valora.training.teachers  # noqa: F401

    loader = LOADERS.get(kind)
    if loader is None:
        raise SpecError(
            f"source {ctx.name}: unknown source type {kind!r}; known: {sorted(LOADERS)}")
    return loader(options, ctx)
