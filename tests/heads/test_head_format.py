"""Task-head files: round trip, lookup rules inside an adapter directory, and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from valora.errors import InvalidAdapterError, InvalidRequestError
from valora.heads import (
    ClassificationHead,
    DetectionHead,
    HeadSpec,
    build_task_head,
    list_task_heads,
    load_task_head,
    save_task_head,
)


def classification_spec(task: str = "digits", **kw: object) -> HeadSpec:
    fields: dict[str, object] = {"kind": "classification", "task": task, "labels": ("a", "b", "c"),
                                 "hidden_size": 16, "params": {"mlp_hidden": 8}}
    fields.update(kw)
    return HeadSpec(**fields)  # type: ignore[arg-type]


def detection_spec() -> HeadSpec:
    return HeadSpec(kind="detection", task="boxes", labels=("cat", "dog"), hidden_size=16,
                    num_input_tokens=5, params={"dim": 16, "num_heads": 2, "num_queries": 3,
                                                "num_layers": 1, "score_threshold": 0.0,
                                                "nms_iou": 1.0})


@pytest.mark.parametrize("make_spec", [classification_spec, detection_spec])
def test_round_trip_reproduces_outputs(tmp_path: Path, make_spec: object) -> None:
    torch.manual_seed(0)
    head = build_task_head(make_spec())  # type: ignore[operator]
    save_task_head(head, tmp_path)
    loaded = load_task_head(tmp_path)
    assert loaded is not None and type(loaded) is type(head)
    assert loaded.spec == head.spec
    hidden = torch.randn(head.num_input_tokens + 2, 16)
    original, restored = head.run(hidden), loaded.run(hidden)
    assert restored.to_dict() == original.to_dict()
    json.dumps(restored.to_dict())  # JSON-ready


def test_classification_result_fields() -> None:
    torch.manual_seed(1)
    head = build_task_head(classification_spec())
    result = head.run(torch.randn(1, 16))
    assert result.kind == "classification"
    assert set(result.scores) == {"a", "b", "c"}
    assert result.label == max(result.scores, key=lambda k: result.scores[k])
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.boxes == []


def test_detection_result_boxes_are_normalised() -> None:
    torch.manual_seed(2)
    head = build_task_head(detection_spec())
    assert isinstance(head, DetectionHead)
    result = head.run(torch.randn(5, 16))
    assert len(result.boxes) == 3  # threshold 0: every query is kept
    for box in result.boxes:
        assert all(0.0 <= v <= 1.0 for v in (box.cx, box.cy, box.w, box.h, box.score))
        assert box.label in ("cat", "dog")
    assert result.label == ", ".join(b.label for b in result.boxes)
    assert [b.score for b in result.boxes] == sorted((b.score for b in result.boxes), reverse=True)


def test_lookup_rules(tmp_path: Path) -> None:
    assert load_task_head(tmp_path) is None  # a plain LoRA adapter
    save_task_head(build_task_head(classification_spec("digits")), tmp_path / "heads" / "digits")
    save_task_head(build_task_head(classification_spec("fashion")), tmp_path / "heads" / "fashion")
    assert list_task_heads(tmp_path) == ["digits", "fashion"]
    assert load_task_head(tmp_path) is None  # named heads are never picked implicitly
    fashion = load_task_head(tmp_path, "fashion")
    assert fashion is not None and fashion.task == "fashion"
    assert load_task_head(tmp_path, "other") is None
    save_task_head(build_task_head(classification_spec("default_task")), tmp_path)
    default = load_task_head(tmp_path)
    assert default is not None and default.task == "default_task"
    assert load_task_head(tmp_path, "default_task") is not None
    assert load_task_head(tmp_path, "digits").task == "digits"  # type: ignore[union-attr]


def test_run_rejects_short_or_wrong_input() -> None:
    head = build_task_head(detection_spec())
    with pytest.raises(InvalidRequestError, match="last 5 prompt tokens"):
        head.run(torch.randn(3, 16))
    with pytest.raises(InvalidRequestError, match="expects hidden states"):
        head.run(torch.randn(5, 12))


def _corrupt(tmp_path: Path, edit: object) -> Path:
    save_task_head(build_task_head(classification_spec()), tmp_path)
    edit(tmp_path)  # type: ignore[operator]
    return tmp_path


def _edit_json(path: Path, **changes: object) -> None:
    raw = json.loads((path / "task_head.json").read_text())
    raw.update(changes)
    (path / "task_head.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: (p / "task_head.safetensors").unlink(), "task_head.safetensors is missing"),
    (lambda p: (p / "task_head.json").write_text("{not json"), "not valid JSON"),
    (lambda p: _edit_json(p, kind="segmentation"), "unknown kind 'segmentation'"),
    (lambda p: _edit_json(p, labels=["a", "a", "b"]), "labels must be distinct"),
    (lambda p: _edit_json(p, labels=["a"]), "at least 2 labels"),
    (lambda p: _edit_json(p, num_input_tokens=0), "num_input_tokens must be a positive integer"),
    (lambda p: _edit_json(p, pooling="max"), "pooling must be one of"),
    (lambda p: _edit_json(p, format_version=7), "format_version 7 is not supported"),
    (lambda p: _edit_json(p, extra=1), "unknown field"),
    (lambda p: _edit_json(p, labels=["a", "b", "c", "d"]), "has shape"),
    (lambda p: _edit_json(p, params={"mlp_hidden": -1}), "mlp_hidden must be a positive integer"),
    (lambda p: (p / "task_head.safetensors").write_bytes(b"garbage"), "unreadable"),
])
def test_malformed_heads_raise_invalid_adapter(tmp_path: Path, edit: object, message: str) -> None:
    path = _corrupt(tmp_path, edit)
    with pytest.raises(InvalidAdapterError, match=message):
        load_task_head(path)


def test_nan_and_missing_tensors_are_rejected(tmp_path: Path) -> None:
    save_task_head(build_task_head(classification_spec()), tmp_path)
    tensors = load_file(str(tmp_path / "task_head.safetensors"))
    bad = dict(tensors)
    bad["fc1.weight"] = torch.full_like(bad["fc1.weight"], float("nan"))
    save_file(bad, str(tmp_path / "task_head.safetensors"))
    with pytest.raises(InvalidAdapterError, match="NaN"):
        load_task_head(tmp_path)
    missing = {k: v for k, v in tensors.items() if k != "fc2.bias"}
    save_file(missing, str(tmp_path / "task_head.safetensors"))
    with pytest.raises(InvalidAdapterError, match="missing"):
        load_task_head(tmp_path)


def test_detection_dims_validated() -> None:
    with pytest.raises(InvalidAdapterError, match="divisible"):
        DetectionHead(HeadSpec(kind="detection", task="t", labels=("x",), hidden_size=8,
                               params={"dim": 10, "num_heads": 4}))
    with pytest.raises(InvalidAdapterError, match="is not 'classification'"):
        ClassificationHead(detection_spec())


def test_missing_adapter_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="does not exist"):
        load_task_head(tmp_path / "nope")
