"""A reduced ``valora adapters build`` end to end on a tiny random LLaVA: one fusion, one
rollback forced by a requirement no shared adapter can meet, outputs PEFT can load, resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_spec
from safetensors.torch import load_file

from valora.heads import load_task_head
from valora.training.backbone import Backbone
from valora.training.checkpoints import load_adapter
from valora.training.cli import main
from valora.training.spec import TrainingSpec


def write_spec(raw: dict[str, Any], datasets: Path, path: Path) -> Path:
    for source in raw["sources"]:
        source["path"] = str(datasets / source["path"])
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def build(tiny_llava: Path, datasets: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("build")
    spec = write_spec(small_spec(), datasets, root / "spec.json")
    assert main(["build", str(spec), "--out", str(root / "out"), "--base", str(tiny_llava)]) == 0
    yield root
    torch.set_num_threads(previous)


def manifest_of(build: Path) -> dict[str, Any]:
    return json.loads((build / "out" / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_one_fusion_and_one_rollback(build: Path) -> None:
    manifest = manifest_of(build)
    assert len(manifest["adapters"]) == 2
    accepted = [a for a in manifest["attempts"] if a["accepted"]]
    rolled_back = [a for a in manifest["attempts"] if not a["accepted"]]
    assert len(accepted) == 1 and len(rolled_back) == 1
    # bright and dark give opposite answers to the same inputs: they never share an adapter.
    conflict = {*rolled_back[0]["members"], rolled_back[0]["task"]}
    assert {"bright", "dark"} <= conflict
    assert "< requirement" in rolled_back[0]["reasons"][0]
    groups = [set(a["tasks"]) for a in manifest["adapters"]]
    assert not any({"bright", "dark"} <= g for g in groups)
    for name, task in manifest["tasks"].items():
        assert task["met"], name
        assert task["accuracy"] >= task["requirement"]
        assert task["accuracy"] - task["base_accuracy"] >= 0.24
    assert manifest["unreachable"] == [] and manifest["failed"] == {}


def test_outputs_are_peft_adapters_with_heads(build: Path, tiny_llava: Path) -> None:
    manifest = manifest_of(build)
    colour = manifest["tasks"]["colour"]
    adapter_dir = build / "out" / "adapters" / colour["adapter"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert tensors and all("language_model" in k and "vision" not in k for k in tensors)
    members = next(a for a in manifest["adapters"] if a["name"] == colour["adapter"])["tasks"]
    fused = len(members) > 1
    head = load_task_head(adapter_dir, "colour")
    assert head is not None and head.labels == ("blue", "green", "red")
    assert (load_task_head(adapter_dir) is None) == fused  # fused adapters: named heads only
    assert colour["head"] == ("colour" if fused else ".")
    for name in ("report.md", "report.png", "report.json"):
        assert (build / "out" / name).stat().st_size > 0
    assert "rolled back" in (build / "out" / "report.md").read_text()


def test_saved_adapter_reloads_in_peft_with_identical_outputs(build: Path,
                                                              tiny_llava: Path) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    manifest = manifest_of(build)
    adapter_dir = build / "out" / "adapters" / manifest["tasks"]["dark"]["adapter"]
    ours = Backbone(tiny_llava, TrainingSpec(rank=4, alpha=8), seed=0)
    ours.load_lora_state(load_adapter(build / "out" / "work" / "single" / "dark").lora)
    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([ours.prompt_ids("Is it bright?")])
    features = torch.randn(1, ours.num_image_tokens, ours.hidden_size)
    embeds = ours.embed(ids, features)
    with torch.no_grad():
        expected = ours.hidden_states(embeds, torch.ones_like(ids))
        language_model = peft_model.base_model.model.model.language_model
        actual = language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(actual, expected)


def test_skipped_images_are_counted(build: Path) -> None:
    state = json.loads((build / "out" / "state.json").read_text())
    assert state["data"]["colour"]["skipped"] == 1
    assert state["data"]["bright"]["skipped"] == 1


def test_resume_after_interruption_gives_the_same_adapters(build: Path, tiny_llava: Path) -> None:
    out = build / "out"
    before = manifest_of(build)
    weights = {a["name"]: load_file(str(out / a["path"] / "adapter_model.safetensors"))
               for a in before["adapters"]}
    # Interrupt "during packing": forget the fusion attempts and everything after them.
    state = json.loads((out / "state.json").read_text())
    state.pop("attempts")
    state.pop("text_accuracy", None)
    (out / "state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "work" / "fused")
    shutil.rmtree(out / "adapters")
    (out / "manifest.json").unlink()
    spec = str(build / "spec.json")
    assert main(["build", spec, "--out", str(out), "--base", str(tiny_llava)]) == 0
    after = manifest_of(build)
    assert after["tasks"] == before["tasks"] and after["attempts"] == before["attempts"]
    for adapter in after["adapters"]:
        again = load_file(str(out / adapter["path"] / "adapter_model.safetensors"))
        for key, value in weights[adapter["name"]].items():
            assert torch.equal(again[key], value), key


def test_resume_refuses_a_different_spec(build: Path, tiny_llava: Path, datasets: Path) -> None:
    other = write_spec(small_spec(steps=41), datasets, build / "other.json")
    code = main(["build", str(other), "--out", str(build / "out"), "--base", str(tiny_llava)])
    assert code == 2


@pytest.mark.gpu
def test_reduced_build_on_cuda(tiny_llava: Path, datasets: Path, tmp_path: Path) -> None:
    spec = write_spec(small_spec(), datasets, tmp_path / "spec.json")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--base", str(tiny_llava),
                 "--device", "cuda"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(task["met"] for task in manifest["tasks"].values())
    assert "cuda" in json.loads((out / "report.json").read_text())["machine"]


def test_parallel_single_task_adapters_match_the_sequential_build(
        build: Path, tiny_llava: Path, datasets: Path, tmp_path: Path) -> None:
    spec = write_spec(small_spec(), datasets, tmp_path / "spec.json")
    out = tmp_path / "out"
    assert main(["build", str(spec), "--out", str(out), "--base", str(tiny_llava), "--jobs", "2",
                 "--threads", "1"]) == 0
    sequential, parallel = manifest_of(build), json.loads((out / "manifest.json").read_text())
    assert parallel["tasks"] == sequential["tasks"]
    assert parallel["attempts"] == sequential["attempts"]
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["bright", "colour", "dark"]
