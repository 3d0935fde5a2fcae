"""The shipped default model, loaded with plain transformers: format, size and accuracy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from valora.assets import default_model_path
from valora.training.default_eval import eval_set, evaluate, generate_answers
from valora.training.scenes import COLOURS, SHAPES, generate_scene

MODEL_DIR = default_model_path()


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaForConditionalGeneration.from_pretrained(str(MODEL_DIR)).eval()


@pytest.fixture(scope="module")
def processor() -> LlavaProcessor:
    return LlavaProcessor.from_pretrained(str(MODEL_DIR))


def test_shipped_files_and_size() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json", "valora_default_model.json"):
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in Path(MODEL_DIR).iterdir())
    assert total <= 50 * 2**20


def test_config_contract(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> None:
    """The facts the engine relies on: <image> id 4, </s> id 2 as EOS, 16 image tokens."""
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index == 4
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 2
    assert model.config.text_config.eos_token_id == 2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.vision_feature_layer == -1
    image = generate_scene(0).image
    inputs = processor(images=[image], text=["USER: <image>\nHi\nASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == 4).sum()) == 16
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nQ?\nASSISTANT:"


def test_answers_fixed_visual_questions(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor
) -> None:
    report = evaluate(model, processor, eval_set())
    assert report.num_questions == 100
    assert report.accuracy >= 0.9, (report.per_kind, report.mistakes)
    recorded = json.loads((MODEL_DIR / "valora_default_model.json").read_text())["eval"]
    assert abs(recorded["accuracy"] - report.accuracy) < 1e-9


def test_captions_name_what_is_drawn(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor
) -> None:
    """"Describe the image." lists coloured shapes; most named pairs are really in the scene."""
    scenes = [generate_scene(2_000_000_000 + i, "shapes") for i in range(12)]
    captions = generate_answers(model, processor, [s.image for s in scenes],
                                ["Describe the image."] * len(scenes), max_new_tokens=32)
    pattern = rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    named = correct = 0
    for scene, caption in zip(scenes, captions, strict=True):
        assert caption.strip().startswith("A") and caption.strip().endswith("."), caption
        present = {(o.colour, o.what) for o in scene.objects}
        pairs = re.findall(pattern, caption.lower())
        assert pairs, caption
        named += len(pairs)
        correct += sum(pair in present for pair in pairs)
    assert correct >= 0.8 * named
