"""The build report: ``report.md`` (tables), ``report.png`` (plot) and ``report.json``.

The plot has one group of bars per task — base model, single-task adapter, final (possibly
fused) adapter — with the requirement as a black tick, and the adapter count in the title.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from valora.training.packing import PackingResult

if TYPE_CHECKING:
    from valora.training.builder import AdapterBuilder


def machine_description(device: str = "cpu") -> str:
    """CPU model, core count and torch thread count of this machine, plus the accelerator the
    build trained on when ``device`` is not the CPU."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    text = (f"{platform.node()}: {model}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f"; trained on {device} ({torch.cuda.get_device_name(torch.device(device))})"
    return text


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _task_rows(manifest: dict[str, Any]) -> list[str]:
    rows = ["| task | kind | adapter | requirement | base | single-task | final "
            "| final − base | final − single | decoded text | teacher | met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in manifest["tasks"].items():
        teacher = t["teacher_accuracy"]
        teacher_cell = "—" if teacher is None else _pct(teacher)
        if teacher:
            teacher_cell += f" (student/teacher {t['accuracy'] / teacher:.3f})"
        rows.append(
            f"| {name} | {t['kind']} | {t['adapter']} | {_pct(t['requirement'])} | "
            f"{_pct(t['base_accuracy'])} | {_pct(t['single_accuracy'])} | {_pct(t['accuracy'])} | "
            f"{100 * (t['accuracy'] - t['base_accuracy']):+.1f} | "
            f"{100 * (t['accuracy'] - t['single_accuracy']):+.1f} | {_pct(t['text_accuracy'])} | "
            f"{teacher_cell} | {'yes' if t['met'] else 'NO'} |")
    return rows


def _attempt_rows(result: PackingResult) -> list[str]:
    rows = ["| # | into adapter with | task | verdict | accuracies |", "|---|---|---|---|---|"]
    for i, a in enumerate(result.attempts):
        accs = ", ".join(f"{k} {_pct(v)}" for k, v in a.accuracies.items())
        verdict = "fused" if a.accepted else "rolled back: " + "; ".join(a.reasons)
        rows.append(f"| {i} | {', '.join(a.members)} | {a.task} | {verdict} | {accs} |")
    return rows


def write_plot(manifest: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(manifest["tasks"])
    tasks = [manifest["tasks"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 4.0))
    width = 0.26
    series = (("base model", "base_accuracy", "#bbbbbb"), ("single-task adapter", "single_accuracy",
              "#7fa7d9"), ("final adapter", "accuracy", "#1f5fa8"))
    for k, (label, key, colour) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax.bar(xs, [100 * t[key] for t in tasks], width, label=label, color=colour)
    ax.scatter(range(len(names)), [100 * t["requirement"] for t in tasks], marker="_", s=900,
               color="black", label="requirement", zorder=3)
    ticks = [f"{n}\n({t['adapter']})" for n, t in zip(names, tasks, strict=True)]
    ax.set_xticks(range(len(names)), ticks)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{len(names)} tasks in {len(manifest['adapters'])} adapters")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(builder: AdapterBuilder, result: PackingResult, manifest: dict[str, Any]) -> Path:
    out = builder.out_dir
    machine = machine_description(str(getattr(builder, "device", "cpu")))
    timings = builder.state.section("timings_s")
    failed = manifest["failed"]
    lines = [
        "# Adapter build report", "",
        f"- machine: {machine}",
        f"- base model: `{manifest['base_model']}`; seed {manifest['seed']}",
        f"- tasks: {len(manifest['tasks'])} trained, {len(failed)} failed; "
        f"adapters: {len(manifest['adapters'])}; fusion attempts: {len(result.attempts)} "
        f"({sum(a.accepted for a in result.attempts)} fused, "
        f"{sum(not a.accepted for a in result.attempts)} rolled back)",
        f"- wall time (s): {', '.join(f'{k} {v}' for k, v in timings.items())}",
        "", "Accuracies in % on each task's validation split. *final* is the adapter the manifest "
        "serves the task from (through its head for classification/detection); *decoded text* "
        "is the same adapter answering by decoding the label.", "",
        *_task_rows(manifest), "", "## Fusion attempts", "", *_attempt_rows(result), "",
        "## Adapters", "", "| adapter | tasks | size (bytes) |", "|---|---|---|",
        *[f"| {a['name']} | {', '.join(a['tasks'])} | {a['size_bytes']} |"
          for a in manifest["adapters"]],
        "", "![accuracy per task](report.png)", "",
    ]
    if manifest["unreachable"]:
        lines += [f"**Unreachable on their own** (single-task adapter below the bar; offered to "
                  f"fusion, kept only if a fused adapter lifted them): "
                  f"{', '.join(manifest['unreachable'])}", ""]
    if failed:
        lines += ["**Failed tasks**:", "", *[f"- {k}: {v}" for k, v in failed.items()], ""]
    (out / "report.md").write_text("\n".join(lines))
    write_plot(manifest, out / "report.png")
    summary = {"machine": machine, "timings_s": timings, "manifest": manifest}
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out / "report.md"
