"""Bad input to a build: every problem gets a clear message and the rest of the work is kept."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import small_spec
from sklearn.linear_model import LogisticRegression

from valora.training.cli import main


def _write(raw: dict[str, Any], datasets: Path, path: Path) -> Path:
    for source in raw["sources"]:
        if "path" in source:
            source["path"] = str(datasets / source["path"])
    path.write_text(json.dumps(raw))
    return path


def test_failed_teacher_and_unreachable_requirement_keep_partial_results(
        tiny_llava: Path, datasets: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A teacher trained on 4 features while the spec feeds it 3x8x8 pixels: it fails on use.
    teacher = LogisticRegression().fit([[0.0] * 4, [1.0] * 4], ["red", "blue"])
    (tmp_path / "teacher.pkl").write_bytes(pickle.dumps(teacher))
    raw = small_spec(steps=20)
    raw["tasks"] = [raw["tasks"][0],  # type: ignore[index]
                    {"name": "impossible", "kind": "vqa", "prompt": "{question}",
                     "requirement": 0.9},
                    {"name": "taught", "kind": "classification", "prompt": "Colour?",
                     "requirement": 0.5}]
    raw["sources"] = [raw["sources"][0],  # type: ignore[index]
                      # The same images with opposite answers: no model exceeds ~50 %.
                      {"task": "impossible", "type": "jsonl", "path": "dark.jsonl", "limit": 20},
                      {"task": "impossible", "type": "jsonl", "path": "bright.jsonl", "limit": 20},
                      {"task": "taught", "type": "teacher",
                       "teacher": {"kind": "sklearn", "path": str(tmp_path / "teacher.pkl"),
                                   "size": [8, 8]},
                       "images": {"type": "image_folder", "path": str(datasets / "colours")}}]
    spec = _write(raw, datasets, tmp_path / "spec.json")
    code = main(["build", str(spec), "--out", str(tmp_path / "out"), "--base", str(tiny_llava)])
    assert code == 1
    err = capsys.readouterr().err
    assert "below requirement or failed: impossible, taught" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "teacher sklearn(teacher.pkl) failed on images" in manifest["failed"]["taught"]
    assert manifest["unreachable"] == ["impossible"]
    assert not manifest["tasks"]["impossible"]["met"]
    assert manifest["tasks"]["colour"]["met"]
    tried = [a for a in manifest["attempts"] if "impossible" in (*a["members"], a["task"])]
    assert tried and not any(a["accepted"] for a in tried)  # offered to fusion, rolled back
    assert len(manifest["adapters"]) == 2  # each task keeps its best adapter
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Unreachable on their own" in report and "Failed tasks" in report


def test_too_many_corrupt_images_fail_only_that_task(tiny_llava: Path, datasets: Path,
                                                      tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(datasets / "colours", broken)
    for path in list((broken / "green").iterdir())[:10]:
        path.write_bytes(b"truncated")
    raw = small_spec(steps=10)
    raw["tasks"] = raw["tasks"][:2]  # type: ignore[index]
    raw["sources"] = [{"task": "colour", "type": "image_folder", "path": str(broken)},
                      raw["sources"][1]]  # type: ignore[index]
    spec = _write(raw, datasets, tmp_path / "spec.json")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--base", str(tiny_llava)]) == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "11 of 73 items are missing or corrupt" in manifest["failed"]["colour"]
    assert list(manifest["tasks"]) == ["bright"]


def test_spec_errors_stop_before_any_work(tiny_llava: Path, datasets: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    raw = small_spec()
    raw["tasks"][0]["kind"] = "segmentation"  # type: ignore[index]
    spec = _write(raw, datasets, tmp_path / "spec.json")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--base", str(tiny_llava)]) == 2
    assert "unknown task kind 'segmentation'" in capsys.readouterr().err
    assert not out.exists()
    good = _write(small_spec(), datasets, tmp_path / "good.json")
    assert main(["build", str(good), "--out", str(out), "--base", str(tmp_path / "no_model")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(datasets: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write(small_spec(), datasets, tmp_path / "spec.json")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()
