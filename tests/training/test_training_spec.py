"""Build-spec parsing and the checks that stop a build before any work."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import small_spec

from valora.training.errors import SpecError
from valora.training.pipeline import check_sources
from valora.training.spec import load_spec, parse_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "adapters" / "vision_tasks.toml"


def _parse(raw: dict[str, Any]) -> Any:
    return parse_spec(raw, Path("/data"))


def test_example_spec_parses() -> None:
    spec = load_spec(EXAMPLE)
    assert [t.name for t in spec.tasks] == ["digits", "fashion", "faces", "face_in_scene"]
    assert all(t.kind == "classification" for t in spec.tasks)
    assert spec.training.fusion_tolerance == 0.02
    assert any(s.type == "teacher" for s in spec.sources)
    check_sources(spec)


def test_json_and_toml_agree(tmp_path: Path) -> None:
    raw = small_spec()
    (tmp_path / "a.json").write_text(json.dumps(raw))
    toml = ["seed = 0", "[training]", 'strategy = "given"', "steps = 7"]
    for task in raw["tasks"]:  # type: ignore[attr-defined]
        toml += ["[[tasks]]", *(f"{k} = {json.dumps(v)}" for k, v in task.items())]
    for source in raw["sources"]:  # type: ignore[attr-defined]
        toml += ["[[sources]]", *(f"{k} = {json.dumps(v)}" for k, v in source.items())]
    (tmp_path / "a.toml").write_text("\n".join(toml) + "\n")
    from_json, from_toml = load_spec(tmp_path / "a.json"), load_spec(tmp_path / "a.toml")
    assert from_json.tasks == from_toml.tasks and from_json.sources == from_toml.sources
    assert from_toml.training.steps == 7 and from_toml.training.strategy == "given"
    assert from_json.resolve("colours") == tmp_path / "colours"
    assert from_json.digest != from_toml.digest  # the training tables differ


def _with(path: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(small_spec())
    target = raw
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]  # type: ignore[index]
    last = keys[-1]
    target[int(last) if last.isdigit() else last] = value  # type: ignore[index]
    return raw


@pytest.mark.parametrize(("raw", "message"), [
    (_with("tasks.0.kind", "segmentation"), "unknown task kind 'segmentation'; known kinds: vqa"),
    (_with("tasks.0.requirement", 1.5), "requirement must be a number in"),
    (_with("tasks.0.name", "bad name!"), "name must be letters"),
    (_with("tasks.1.name", "colour"), "task names must be unique"),
    (_with("tasks.0.colour", 1), "unknown field"),
    (_with("sources.0.task", "nope"), "is not one of the tasks"),
    (_with("sources.0.split", "test"), "split must be one of"),
    (_with("sources", [{"task": "colour", "type": "image_folder"}]),
     "task 'bright' has no knowledge"),
    (_with("training.strategy", "random"), "strategy must be one of"),
    (_with("training.steps", 0), "steps must be a positive integer"),
    (_with("training.fusion_tolerance", 2.0), "fusion_tolerance"),
    (_with("tasks", []), "'tasks' must be a non-empty list"),
    (_with("extra", 1), "unknown top-level"),
])
def test_bad_specs_name_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _parse(raw)


def test_unparseable_files(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("tasks = [\n")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec(tmp_path / "bad.toml")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.json")


@pytest.mark.parametrize(("source", "message"), [
    ({"task": "colour", "type": "parquet"}, "unknown source type 'parquet'"),
    ({"task": "colour", "type": "teacher", "teacher": {"kind": "tensorflow"},
      "images": {"type": "image_folder"}}, "unknown teacher kind 'tensorflow'"),
    ({"task": "colour", "type": "teacher", "teacher": {"kind": "opencv_haar"},
      "images": {"type": "webdataset"}}, "unknown source type 'webdataset'"),
    ({"task": "colour", "type": "teacher", "teacher": {"kind": "opencv_haar"}}, "needs 'teacher'"),
])
def test_check_sources_before_any_work(source: dict[str, Any], message: str) -> None:
    spec = _parse(_with("sources.0", source))
    with pytest.raises(SpecError, match=message):
        check_sources(spec)


def test_detection_needs_detection_sources() -> None:
    raw = _with("tasks.0.kind", "detection")
    with pytest.raises(SpecError, match="detection tasks take coco"):
        check_sources(_parse(raw))
