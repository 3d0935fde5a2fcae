"""Fixtures for adapter-generation tests: a tiny random LLaVA and small synthetic datasets on
disk (an image folder of colours with one corrupt file, JSONL brightness questions and the same
questions with every answer flipped — a task that cannot share an adapter with the first)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from valora.testing.checkpoints import build_tiny_llava

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second OpenMP thread only spins."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def write_datasets(root: Path, per_colour: int = 24, num_bright: int = 72) -> Path:
    rng = random.Random(0)
    for name, rgb in COLOURS.items():
        folder = root / "colours" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            pixels = np.ones((16, 16, 3)) * np.array(rgb) + rng.randint(-40, 40)
            Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(folder / f"{i}.png")
    (root / "colours" / "red" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "bright").mkdir(exist_ok=True)
    lines, flipped = [], []
    for i in range(num_bright):
        bright = i % 2 == 0
        value = rng.randint(170, 250) if bright else rng.randint(5, 80)
        image = Image.fromarray(np.full((16, 16, 3), value, dtype="uint8"))
        image.save(root / "bright" / f"{i}.png")
        answer, other = ("yes", "no") if bright else ("no", "yes")
        lines.append({"image": f"bright/{i}.png", "question": "Is it bright?", "answer": answer})
        flipped.append({"image": f"bright/{i}.png", "question": "Is it bright?", "answer": other})
    lines.append({"image": "bright/missing.png", "question": "Is it bright?", "answer": "no"})
    (root / "bright.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (root / "dark.jsonl").write_text("\n".join(json.dumps(x) for x in flipped) + "\n")
    return root


@pytest.fixture(scope="session")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_datasets(tmp_path_factory.mktemp("datasets"))


def small_spec(**training: object) -> dict[str, object]:
    """Three small tasks: colour (classification head), bright (VQA) and dark (bright's answers
    flipped, so fusing it with bright must fail: the same input cannot get both answers)."""
    return {
        "seed": 0,
        "training": {"rank": 4, "alpha": 8, "steps": 40, "fusion_steps": 40, "batch_size": 8,
                     "learning_rate": 3e-3, "max_new_tokens": 4, "max_bad_image_fraction": 0.1,
                     **training},
        "tasks": [
            {"name": "colour", "kind": "classification", "prompt": "What colour is it?",
             "requirement": 0.8},
            {"name": "bright", "kind": "vqa", "prompt": "{question}", "requirement": 0.8},
            {"name": "dark", "kind": "vqa", "prompt": "{question}", "requirement": 0.8},
        ],
        "sources": [
            {"task": "colour", "type": "image_folder", "path": "colours"},
            {"task": "bright", "type": "jsonl", "path": "bright.jsonl"},
            {"task": "dark", "type": "jsonl", "path": "dark.jsonl"},
        ],
    }
