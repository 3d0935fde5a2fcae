"""Task heads on disk, inside an adapter directory next to the PEFT files.

Layout::

    adapter_dir/
      adapter_config.json, adapter_model.safetensors    (PEFT LoRA)
      task_head.json, task_head.safetensors             (optional: the adapter's default head)
      heads/<task>/task_head.json, task_head.safetensors  (optional: named heads of a fused adapter)

``task_head.json`` is a ``HeadSpec``; ``task_head.safetensors`` holds the head module's
``state_dict`` in float32 with exactly the keys and shapes the spec implies. Lookup rules of
``load_task_head(adapter_dir, task)``:

- ``task`` given: ``heads/<task>/`` if present, else the default head if its ``task`` field
  equals ``task``, else ``None``;
- ``task`` omitted: the default head if present, else ``None``. Named heads are never picked
  implicitly: a fused adapter also serves generative tasks, whose requests must not be
  answered by some other task's head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from valora.errors import InvalidAdapterError
from valora.heads.base import TaskHead
from valora.heads.classification import ClassificationHead
from valora.heads.detection import DetectionHead
from valora.heads.spec import HeadSpec

SPEC_FILE = "task_head.json"
WEIGHTS_FILE = "task_head.safetensors"
NAMED_HEADS_DIR = "heads"

HEAD_KINDS: dict[str, type[TaskHead]] = {
    ClassificationHead.kind: ClassificationHead,
    DetectionHead.kind: DetectionHead,
}


def build_task_head(spec: HeadSpec) -> TaskHead:
    """A freshly initialised head (use ``torch.manual_seed`` first for reproducible weights)."""
    cls = HEAD_KINDS.get(spec.kind)
    if cls is None:
        raise InvalidAdapterError(
            f"task head {spec.task!r}: unknown kind {spec.kind!r}; known: {sorted(HEAD_KINDS)}")
    return cls(spec)


def save_task_head(head: TaskHead, directory: str | Path) -> Path:
    """Write ``task_head.json`` and ``task_head.safetensors`` into ``directory`` (created)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in head.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / SPEC_FILE).write_text(head.spec.to_json() + "\n")
    return out


def read_head_dir(directory: str | Path) -> TaskHead:
    """Load and validate the head stored in ``directory`` (``InvalidAdapterError`` if malformed)."""
    where = Path(directory)
    spec_path, weights_path = where / SPEC_FILE, where / WEIGHTS_FILE
    if not spec_path.is_file():
        raise InvalidAdapterError(f"{where}: no {SPEC_FILE}")
    if not weights_path.is_file():
        raise InvalidAdapterError(f"{where}: {SPEC_FILE} present but {WEIGHTS_FILE} is missing")
    head = build_task_head(HeadSpec.from_json(spec_path.read_text(), str(spec_path)))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{weights_path}: unreadable ({exc})") from exc
    expected = head.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise InvalidAdapterError(
            f"{weights_path}: tensors do not match the {head.kind} head in {SPEC_FILE} "
            f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InvalidAdapterError(
                f"{weights_path}: {key} has shape {list(value.shape)}, the spec implies "
                f"{list(expected[key].shape)}")
        if not torch.isfinite(value).all():
            raise InvalidAdapterError(f"{weights_path}: {key} holds NaN or infinite values")
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.eval()


def list_task_heads(adapter_dir: str | Path) -> list[str]:
    """Task names of the named heads under ``heads/`` (sorted)."""
    root = Path(adapter_dir) / NAMED_HEADS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / SPEC_FILE).exists())


def load_task_head(adapter_dir: str | Path, task: str | None = None) -> TaskHead | None:
    """The head an adapter carries for ``task`` (rules in the module docstring), or ``None``
    when it carries none. A head that is present but malformed raises ``InvalidAdapterError``."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise InvalidAdapterError(f"adapter directory {root} does not exist")
    has_default = (root / SPEC_FILE).exists() or (root / WEIGHTS_FILE).exists()
    named = list_task_heads(root)
    if task is not None:
        if task in named:
            return read_head_dir(root / NAMED_HEADS_DIR / task)
        if has_default:
            head = read_head_dir(root)
            return head if head.task == task else None
        return None
    return read_head_dir(root) if has_default else None
