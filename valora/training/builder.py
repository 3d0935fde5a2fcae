"""``valora adapters build``: data → base accuracy → single-task adapters → packing → outputs.

Output directory::

    state.json              finished steps (resume reads it; see ``checkpoints``)
    work/single/<task>/     single-task adapters (the reference accuracy of each task)
    work/fused/<a+b+...>/   accepted fusion checkpoints
    adapters/adapter_NN/    the final adapters (PEFT files + heads)
    manifest.json           tasks → adapters (+ head, prompt, accuracies)
    report.md, report.png, report.json

Every step is recorded once finished; rerunning the same command resumes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from valora.errors import ModelLoadError
from valora.logger import get_logger
from valora.training.backbone import Backbone
from valora.training.checkpoints import (
    BuildState,
    load_adapter,
    save_adapter,
    step_seed,
)
from valora.training.encoding import EncodedTask, encode_task
from valora.training.errors import DataError, SpecError, TeacherError
from valora.training.evaluate import base_accuracy, task_accuracy
from valora.training.packing import PackingResult, TaskProfile, pack
from valora.training.pipeline import check_sources, load_task, teacher_accuracy
from valora.training.refit import refit_head
from valora.training.spec import BuildSpec
from valora.training.trainer import AdapterState, train_adapter

logger = get_logger(__name__)


def adapter_key(members: tuple[str, ...] | list[str]) -> str:
    return "+".join(members)


MERGED_SECTIONS = ("data", "teacher", "base_accuracy", "single", "failed")


def merge_single(out_dir: Path, part_dir: Path, task: str) -> None:
    """Move ``task``'s finished single-task step from ``part_dir`` (a ``--single-only`` build of
    the same spec and base) into the build in ``out_dir``: its checkpoint and its records. Refuses
    parts of another spec or base; a task already finished in ``out_dir`` is left alone."""
    part = BuildState.read(part_dir)
    main = BuildState(out_dir, part["spec_digest"], Path(part["base_model"]), fresh=False)
    if main.get("single", task) is not None:
        return
    source = part_dir / "work" / "single" / task
    if task in part.get("single", {}):
        target = out_dir / "work" / "single" / task
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    for section in MERGED_SECTIONS:  # "single" after "data": the checkpoint is in place
        if task in part.get(section, {}):
            main.put(section, task, part[section][task])


@dataclass
class BuildOutcome:
    """What the build produced; ``unmet`` lists tasks below their requirement or failed."""

    out_dir: Path
    manifest: dict[str, Any]
    packing: PackingResult
    failed: dict[str, str] = field(default_factory=dict)
    unmet: list[str] = field(default_factory=list)


class AdapterBuilder:
    """Runs a build. ``device`` (``cpu``, ``cuda``...) is where the base model trains; it is
    not part of the spec, so a build may resume on another device (results then differ in the
    last bits, as floating-point order does)."""

    def __init__(self, spec: BuildSpec, out_dir: Path, base_dir: Path,
                 restart: bool = False, device: str = "cpu") -> None:
        self.spec, self.out_dir, self.base_dir = spec, out_dir, base_dir.resolve()
        self.device = device
        check_sources(spec)
        if not (self.base_dir / "config.json").is_file():
            raise ModelLoadError(f"base model directory {self.base_dir} has no config.json")
        self.state = BuildState(out_dir, spec.digest, self.base_dir, fresh=restart)
        self.tasks: dict[str, EncodedTask] = {}
        self.teachers: dict[str, float] = {}
        self._candidate: AdapterState | None = None

    def _timed(self, phase: str, started: float) -> None:
        self.state.put("timings_s", phase, round(time.monotonic() - started, 2))

    def run(self) -> BuildOutcome:
        from valora.training.outputs import write_outputs

        started = time.monotonic()
        self.backbone = Backbone(self.base_dir, self.spec.training, self.spec.seed, self.device)
        self._load_tasks()
        self._timed("data", started)
        t = time.monotonic()
        self._base_accuracies()
        self._timed("base_eval", t)
        t = time.monotonic()
        self._single_adapters()
        self._timed("single_adapters", t)
        t = time.monotonic()
        profiles = [TaskProfile(name, enc.task.kind, enc.labels, self.requirement(name),
                                float(self.state.get("single", name)["accuracy"]))
                    for name, enc in self.tasks.items()]
        training = self.spec.training
        result = pack(profiles, training.strategy, training.max_fusion_attempts,
                      training.fusion_tolerance, self._try_fuse, self._accept)
        self._timed("packing", t)
        t = time.monotonic()
        manifest = write_outputs(self, result)
        self._timed("outputs", t)
        self._timed("total", started)
        from valora.training.report import write_report

        write_report(self, result, manifest)
        failed = self.state.section("failed")
        unmet = [name for name, info in manifest["tasks"].items() if not info["met"]]
        unmet = sorted(unmet + list(failed))
        return BuildOutcome(self.out_dir, manifest, result, failed, unmet)

    def run_single_only(self, task: str) -> float:
        """Only ``task``'s data, base accuracy and single-task adapter (the first, independent
        phase of a build, so several processes can share it; ``merge_single`` then moves the
        result into the main output directory). Returns the single-task accuracy."""
        if task not in {t.name for t in self.spec.tasks}:
            raise SpecError(f"--single-only: {task!r} is not a task of the spec")
        self.backbone = Backbone(self.base_dir, self.spec.training, self.spec.seed, self.device)
        self._load_tasks(only=task)
        if task not in self.tasks:
            raise DataError(f"task {task} failed: {self.state.get('failed', task)}")
        self._base_accuracies()
        self._single_adapters()
        return float(self.state.get("single", task)["accuracy"])

    def requirement(self, task: str) -> float:
        """The task's requirement, raised to ``teacher_fraction`` × the teacher's accuracy."""
        spec = self.tasks[task].task
        teacher = self.teachers.get(task)
        if spec.teacher_fraction is None or teacher is None:
            return spec.requirement
        return max(spec.requirement, spec.teacher_fraction * teacher)

    # ----- steps ---------------------------------------------------------------------------
    def _load_tasks(self, only: str | None = None) -> None:
        tasks = [t for t in self.spec.tasks if only is None or t.name == only]
        for task in tqdm(tasks, desc="load data", leave=False):
            try:
                data = load_task(self.spec, task)
            except (DataError, TeacherError) as exc:
                logger.error("task %s failed: %s", task.name, exc)
                self.state.put("failed", task.name, str(exc))
                continue
            if task.name in self.state.section("failed"):
                self.state.data["failed"].pop(task.name)
            if data.teacher is not None:
                cached = self.state.get("teacher", task.name)
                if cached is None:
                    cached = {"accuracy": teacher_accuracy(data), "name": data.teacher.name}
                    self.state.put("teacher", task.name, cached)
                if cached["accuracy"] is not None:
                    self.teachers[task.name] = float(cached["accuracy"])
            self.state.put("data", task.name, {
                "train": len(data.train), "validation": len(data.validation),
                "labels": list(data.labels), "skipped": data.num_skipped,
                "validated_on_teacher_labels": data.validated_on_teacher_labels})
            self.tasks[task.name] = encode_task(self.backbone, data)

    def _evaluate(self, enc: EncodedTask, state: AdapterState | None) -> float:
        training = self.spec.training
        if state is None:
            return base_accuracy(self.backbone, enc, training.max_new_tokens,
                                 training.eval_batch_size)
        self.backbone.load_lora_state(state.lora)
        return task_accuracy(self.backbone, enc, state.heads.get(enc.task.name),
                             training.max_new_tokens, training.eval_batch_size)

    def _base_accuracies(self) -> None:
        for name, enc in tqdm(self.tasks.items(), desc="base model accuracy", leave=False):
            if self.state.get("base_accuracy", name) is None:
                self.state.put("base_accuracy", name, self._evaluate(enc, None))

    def _single_adapters(self) -> None:
        for name in tqdm(list(self.tasks), desc="single-task adapters", leave=False):
            if self.state.get("single", name) is not None:
                continue
            started = time.monotonic()
            steps = self.tasks[name].task.steps or self.spec.training.steps
            state = train_adapter(self.backbone, self.tasks, None, name, steps,
                                  self.spec.training, step_seed(self.spec.seed, f"single:{name}"))
            self._refit_heads(state, f"single:{name}")
            accuracy = self._evaluate(self.tasks[name], state)
            save_adapter(self.backbone, state, self.checkpoint_dir((name,)))
            self.state.put("single", name, {"accuracy": accuracy,
                                            "seconds": round(time.monotonic() - started, 2)})

    def _refit_heads(self, state: AdapterState, key: str) -> None:
        """``head_refit_steps`` of head-only training per head, the state's LoRA frozen."""
        training = self.spec.training
        if training.head_refit_steps <= 0:
            return
        self.backbone.load_lora_state(state.lora)
        for task, head in state.heads.items():
            seed = step_seed(self.spec.seed, f"refit:{key}:{task}")
            refit_head(self.backbone, self.tasks[task], head, training.head_refit_steps,
                       training.head_learning_rate, seed)

    def checkpoint_dir(self, members: tuple[str, ...] | list[str]) -> Path:
        kind = "single" if len(members) == 1 else "fused"
        return self.out_dir / "work" / kind / adapter_key(members)

    def _try_fuse(self, members: tuple[str, ...], task: str) -> Mapping[str, float]:
        key = f"{adapter_key(members)}<-{task}"
        cached = self.state.get("attempts", key)
        self._candidate = None
        if cached is not None:
            return dict(cached["accuracies"])
        started = time.monotonic()
        base = load_adapter(self.checkpoint_dir(members))
        warm = load_adapter(self.checkpoint_dir((task,))).heads
        training = self.spec.training
        state = train_adapter(self.backbone, self.tasks, base, task, training.fusion_steps,
                              training, step_seed(self.spec.seed, f"fuse:{key}"), warm)
        self._refit_heads(state, f"fuse:{key}")
        accuracies = {name: self._evaluate(self.tasks[name], state) for name in state.tasks}
        self._candidate = state
        self.state.put("attempts", key, {"accuracies": accuracies, "accepted": None,
                                         "seconds": round(time.monotonic() - started, 2)})
        return accuracies

    def _accept(self, members: tuple[str, ...], task: str) -> None:
        key = f"{adapter_key(members)}<-{task}"
        target = self.checkpoint_dir((*members, task))
        if self._candidate is not None:
            save_adapter(self.backbone, self._candidate, target)
        elif not target.exists():  # resumed after the verdict but before the save: redo it
            self.state.data["attempts"].pop(key, None)
            self._try_fuse(members, task)
            assert self._candidate is not None
            save_adapter(self.backbone, self._candidate, target)
        self._candidate = None
        record = self.state.get("attempts", key)
        record["accepted"] = True
        self.state.put("attempts", key, record)
