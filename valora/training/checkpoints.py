"""Resumable build state and adapter checkpoints in the output directory.

``state.json`` records every finished step (base accuracies, teacher accuracies, single-task
adapters, fusion attempts with their accuracies and verdict, failed tasks). It is rewritten
atomically (write to a temporary file, then rename) *after* the step's checkpoint directory is
complete, so an interrupted build resumes from the last recorded step and redoes at most the
step it was in. Each step is seeded from ``(seed, step key)`` alone, so resuming gives the same
adapters as an uninterrupted run.

An adapter checkpoint is a PEFT directory plus its heads (see ``valora.heads.storage``): a
single-task adapter's head is the default head (root); in a fused adapter every head is a named
head under ``heads/<task>/``, so requests for its other tasks are never answered by a head.
``members.json`` lists the tasks in fusion order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from valora.heads import list_task_heads, load_task_head, save_task_head
from valora.heads.storage import NAMED_HEADS_DIR
from valora.training.backbone import Backbone
from valora.training.errors import SpecError
from valora.training.trainer import AdapterState

STATE_FILE = "state.json"
MEMBERS_FILE = "members.json"


def step_seed(seed: int, key: str) -> int:
    """A 31-bit seed derived from the build seed and a step's key only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "big") & 0x7FFFFFFF


class BuildState:
    """The JSON record of finished steps; ``put`` persists immediately."""

    def __init__(self, out_dir: Path, spec_digest: str, base_dir: Path, fresh: bool) -> None:
        self.path = out_dir / STATE_FILE
        self.data: dict[str, Any] = {"spec_digest": spec_digest, "base_model": str(base_dir)}
        if self.path.exists() and not fresh:
            saved = json.loads(self.path.read_text())
            if saved.get("spec_digest") != spec_digest or saved.get("base_model") != str(base_dir):
                raise SpecError(
                    f"{out_dir} holds a build of a different spec or base model; use a new output "
                    "directory or pass --restart to discard it")
            self.data = saved
        out_dir.mkdir(parents=True, exist_ok=True)
        self._flush()

    @staticmethod
    def read(out_dir: Path) -> dict[str, Any]:
        """The recorded state of the build in ``out_dir`` (``SpecError`` if there is none)."""
        path = out_dir / STATE_FILE
        if not path.is_file():
            raise SpecError(f"{out_dir} holds no build ({STATE_FILE} is missing)")
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def get(self, section: str, key: str) -> Any:
        return self.data.get(section, {}).get(key)

    def section(self, section: str) -> dict[str, Any]:
        return dict(self.data.get(section, {}))

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self._flush()

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


def save_adapter(backbone: Backbone, state: AdapterState, directory: Path) -> None:
    """Write ``state`` as a complete adapter directory (replacing any previous one)."""
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.load_lora_state(state.lora)
    backbone.save_adapter(tmp)
    if len(state.tasks) == 1 and state.heads:
        save_task_head(state.heads[state.tasks[0]], tmp)
    else:
        for task, head in state.heads.items():
            save_task_head(head, tmp / NAMED_HEADS_DIR / task)
    (tmp / MEMBERS_FILE).write_text(json.dumps({"tasks": list(state.tasks)}, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_adapter(directory: Path) -> AdapterState:
    """Read back what ``save_adapter`` wrote (LoRA keys as PEFT's state dict has them)."""
    tasks = tuple(json.loads((directory / MEMBERS_FILE).read_text())["tasks"])
    lora = load_file(str(directory / "adapter_model.safetensors"))
    heads = {name: head for name in list_task_heads(directory)
             if (head := load_task_head(directory, name)) is not None}
    default = load_task_head(directory)
    if default is not None:
        heads[default.task] = default
    return AdapterState(tasks, lora, heads)


def copy_adapter(source: Path, directory: Path) -> None:
    """Copy a finished checkpoint to its final place (without the bookkeeping file)."""
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns(MEMBERS_FILE, "README.md"))
