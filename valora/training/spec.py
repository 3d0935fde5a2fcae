"""The build spec of ``valora adapters build SPEC`` (JSON, or TOML read with ``tomllib``).

A spec has ``tasks`` (what the adapters must do, with an accuracy requirement each),
``sources`` (labelled datasets and teachers, each feeding one task) and optional ``training``
knobs, ``seed`` and ``base`` (a LLaVA-format model directory; default: the embedded model).
Relative paths are resolved against the spec file's directory. See ``docs/adapters.md`` for
every field; ``examples/adapters/vision_tasks.toml`` is a complete example.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from valora.training.errors import SpecError

TASK_KINDS = ("vqa", "caption", "classification", "detection")
BOUNDED_KINDS = ("classification", "detection")
SOURCE_SPLITS = ("both", "train", "validation")
STRATEGIES = ("similarity", "given")


@dataclass(frozen=True)
class TaskSpec:
    """One task. ``prompt`` is the user text sent with the image (``{question}`` is replaced by
    a VQA example's question). ``requirement`` is the minimum validation accuracy in ``[0, 1]``
    (classification/VQA: exact-match accuracy; caption: unigram F1; detection: F1 at IoU 0.5).
    ``labels`` fixes a label set and order (default: sorted labels seen in the data).
    ``hflip`` adds a mirrored copy of every training image (after the split, so validation
    images never leak into training). ``steps`` overrides ``training.steps`` for this task's
    single-task adapter (detection heads converge slowly and may need several times more).
    ``teacher_fraction`` (distillation) raises the requirement to that fraction of the teacher's
    accuracy on the validation split once it is measured."""

    name: str
    kind: str
    prompt: str
    requirement: float
    labels: tuple[str, ...] = ()
    validation_fraction: float = 0.2
    max_validation: int = 300
    max_train: int = 2000
    hflip: bool = False
    steps: int | None = None
    teacher_fraction: float | None = None
    head: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bounded(self) -> bool:
        return self.kind in BOUNDED_KINDS


@dataclass(frozen=True)
class SourceSpec:
    """One knowledge source feeding ``task``; ``type`` picks the loader (``valora.training.
    sources``), ``options`` holds the loader's own fields (``path``, ``limit``, ``teacher``...)."""

    task: str
    type: str
    split: str = "both"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSpec:
    """Optimisation and packing knobs (defaults suit the embedded model on a laptop CPU)."""

    rank: int = 8
    alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: str = (r".*language_model.*\."
                           r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    steps: int = 120
    fusion_steps: int = 120
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 1e-3
    head_learning_rate: float = 3e-3
    weight_decay: float = 0.0
    text_loss_weight: float = 0.5
    max_bad_image_fraction: float = 0.05
    fusion_tolerance: float | None = None
    strategy: str = "similarity"
    max_fusion_attempts: int = 2
    max_new_tokens: int = 12
    max_text_eval: int = 200
    head_refit_steps: int = 0


@dataclass(frozen=True)
class BuildSpec:
    """A validated spec. ``digest`` identifies its content (resume refuses a different spec)."""

    tasks: tuple[TaskSpec, ...]
    sources: tuple[SourceSpec, ...]
    training: TrainingSpec
    seed: int
    base: str | None
    root: Path
    digest: str

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def sources_of(self, task: str) -> list[SourceSpec]:
        return [s for s in self.sources if s.task == task]

    def resolve(self, path: str) -> Path:
        """``path`` relative to the spec file's directory (absolute paths unchanged)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a table/object, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _check_task(task: TaskSpec, where: str) -> TaskSpec:
    if not isinstance(task.name, str) or not task.name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"{where}: name must be letters, digits, '-' or '_', got {task.name!r}")
    if task.kind not in TASK_KINDS:
        raise SpecError(f"{where} ({task.name}): unknown task kind {task.kind!r}; "
                        f"known kinds: {', '.join(TASK_KINDS)}")
    if not isinstance(task.prompt, str) or not task.prompt.strip():
        raise SpecError(f"{where} ({task.name}): prompt must be a non-empty string")
    if isinstance(task.requirement, bool) or not isinstance(task.requirement, int | float) \
            or not 0.0 <= task.requirement <= 1.0:
        raise SpecError(f"{where} ({task.name}): requirement must be a number in [0, 1], "
                        f"got {task.requirement!r}")
    if task.teacher_fraction is not None and not 0.0 < task.teacher_fraction <= 1.0:
        raise SpecError(f"{where} ({task.name}): teacher_fraction must lie in (0, 1]")
    if task.steps is not None and (not isinstance(task.steps, int) or task.steps <= 0):
        raise SpecError(f"{where} ({task.name}): steps must be a positive integer")
    if not 0.0 < task.validation_fraction < 1.0:
        raise SpecError(f"{where} ({task.name}): validation_fraction must lie in (0, 1)")
    return TaskSpec(**{**task.__dict__, "labels": tuple(task.labels),
                       "requirement": float(task.requirement), "head": dict(task.head)})


def _check_training(t: TrainingSpec) -> None:
    positive = ("rank", "steps", "batch_size", "eval_batch_size", "max_fusion_attempts",
                "max_new_tokens", "max_text_eval")
    for name in positive:
        value = getattr(t, name)
        if not isinstance(value, int) or value <= 0:
            raise SpecError(f"training.{name} must be a positive integer, got {value!r}")
    for name in ("fusion_steps", "head_refit_steps"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 0:
            raise SpecError(f"training.{name} must be a non-negative integer, got {value!r}")
    if not 0.0 <= t.lora_dropout < 1.0:
        raise SpecError("training.lora_dropout must lie in [0, 1)")
    if t.strategy not in STRATEGIES:
        raise SpecError(f"training.strategy must be one of {STRATEGIES}, got {t.strategy!r}")
    if not 0.0 <= t.max_bad_image_fraction <= 1.0:
        raise SpecError("training.max_bad_image_fraction must lie in [0, 1]")
    if t.fusion_tolerance is not None and not 0.0 <= t.fusion_tolerance <= 1.0:
        raise SpecError("training.fusion_tolerance must lie in [0, 1] (or be omitted)")


def parse_spec(raw: Mapping[str, Any], root: Path) -> BuildSpec:
    """Validate a decoded spec; every problem is a ``SpecError`` naming the offending entry."""
    unknown = sorted(set(raw) - {"tasks", "sources", "training", "seed", "base"})
    if unknown:
        raise SpecError(f"spec: unknown top-level field(s) {unknown}")
    raw_tasks, raw_sources = raw.get("tasks") or [], raw.get("sources") or []
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise SpecError("spec: 'tasks' must be a non-empty list")
    if not isinstance(raw_sources, list):
        raise SpecError("spec: 'sources' must be a list")
    tasks = tuple(_check_task(_build(TaskSpec, t, f"tasks[{i}]"), f"tasks[{i}]")
                  for i, t in enumerate(raw_tasks))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SpecError(f"spec: task names must be unique, got {names}")
    sources = []
    for i, item in enumerate(raw_sources):
        if not isinstance(item, dict):
            raise SpecError(f"sources[{i}]: expected a table/object")
        core = {k: item[k] for k in ("task", "type", "split") if k in item}
        options = {k: v for k, v in item.items() if k not in core}
        source = _build(SourceSpec, {**core, "options": options}, f"sources[{i}]")
        if source.task not in names:
            raise SpecError(f"sources[{i}]: task {source.task!r} is not one of the tasks {names}")
        if source.split not in SOURCE_SPLITS:
            raise SpecError(f"sources[{i}]: split must be one of {SOURCE_SPLITS}")
        sources.append(source)
    for name in names:
        if not any(s.task == name for s in sources):
            raise SpecError(f"task {name!r} has no knowledge source")
    training = _build(TrainingSpec, raw.get("training", {}), "training")
    _check_training(training)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise SpecError(f"spec: seed must be an integer, got {seed!r}")
    canonical = json.dumps(raw, sort_keys=True, default=str).encode()
    return BuildSpec(tasks=tasks, sources=tuple(sources), training=training, seed=seed,
                     base=raw.get("base"), root=root, digest=hashlib.sha256(canonical).hexdigest())


def load_spec(path: str | Path) -> BuildSpec:
    """Read a ``.json`` or ``.toml`` spec file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    text = p.read_text()
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{p}: cannot parse ({exc})") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: the spec must be an object/table")
    return parse_spec(raw, p.resolve().parent)
