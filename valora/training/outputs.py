"""The final adapters and ``manifest.json`` (tasks → adapters) of a finished packing.

Adapter ``adapters/adapter_NN`` is a copy of the checkpoint of its member set. A task's final
accuracy is its single-task accuracy when it sits alone, else the accuracy measured in the
accepted fusion that completed its adapter. For bounded tasks the manifest also records
``text_accuracy``: the accuracy of decoding the label text with the same adapter (no head), on
the first ``training.max_text_eval`` validation examples.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from valora.heads.storage import NAMED_HEADS_DIR, SPEC_FILE
from valora.training.checkpoints import copy_adapter, load_adapter
from valora.training.evaluate import text_path_accuracy
from valora.training.packing import PackingResult

if TYPE_CHECKING:
    from valora.training.builder import AdapterBuilder

MANIFEST_FILE = "manifest.json"


def _final_accuracies(builder: AdapterBuilder, result: PackingResult) -> dict[str, float]:
    accuracies: dict[str, float] = {}
    for members in result.adapters:
        if len(members) == 1:
            accuracies[members[0]] = float(builder.state.get("single", members[0])["accuracy"])
            continue
        attempt = next(a for a in result.attempts
                       if a.accepted and (*a.members, a.task) == tuple(members))
        accuracies.update({k: float(v) for k, v in attempt.accuracies.items()})
    return accuracies


def _text_accuracy(builder: AdapterBuilder, members: list[str], task: str) -> float:
    key = f"{'+'.join(members)}:{task}"
    cached = builder.state.get("text_accuracy", key)
    if cached is None:
        state = load_adapter(builder.checkpoint_dir(members))
        builder.backbone.load_lora_state(state.lora)
        training = builder.spec.training
        cached = text_path_accuracy(builder.backbone, builder.tasks[task], training.max_new_tokens,
                                    training.eval_batch_size, training.max_text_eval)
        builder.state.put("text_accuracy", key, cached)
    return float(cached)


def write_outputs(builder: AdapterBuilder, result: PackingResult) -> dict[str, Any]:
    out = builder.out_dir
    accuracies = _final_accuracies(builder, result)
    adapters, tasks = [], {}
    for index, members in enumerate(result.adapters):
        name = f"adapter_{index:02d}"
        target = out / "adapters" / name
        copy_adapter(builder.checkpoint_dir(members), target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        adapters.append({"name": name, "path": f"adapters/{name}", "tasks": list(members),
                         "size_bytes": size})
        for task in members:
            enc = builder.tasks[task]
            spec = enc.task
            named = (target / NAMED_HEADS_DIR / task / SPEC_FILE).exists()
            default = spec.bounded and (target / SPEC_FILE).exists()
            head = task if named else ("." if default else None)
            accuracy = accuracies[task]
            requirement = builder.requirement(task)
            tasks[task] = {
                "adapter": name, "kind": spec.kind, "prompt": spec.prompt,
                "head": head, "labels": list(enc.labels), "requirement": requirement,
                "accuracy": accuracy,
                "base_accuracy": float(builder.state.get("base_accuracy", task)),
                "single_accuracy": float(builder.state.get("single", task)["accuracy"]),
                "teacher_accuracy": builder.teachers.get(task),
                "text_accuracy": _text_accuracy(builder, members, task) if spec.bounded else None,
                "met": accuracy >= requirement,
                "validation_examples": len(enc.validation),
            }
    manifest = {
        "base_model": str(builder.base_dir), "seed": builder.spec.seed,
        "spec_digest": builder.spec.digest, "adapters": adapters, "tasks": tasks,
        "unreachable": list(result.unreachable), "failed": builder.state.section("failed"),
        "attempts": [{"members": list(a.members), "task": a.task, "accepted": a.accepted,
                      "accuracies": dict(a.accuracies), "reasons": list(a.reasons)}
                     for a in result.attempts],
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
