"""``--jobs N``: the single-task adapters of a build trained by ``N`` processes at once.

The single-task phase is independent per task (each step is seeded from the build seed and its
own key, and each task's data split from the seed and the task), so it is farmed out to child
processes, each running ``valora adapters build SPEC --single-only TASK`` into
``OUT/parts/<task>``; their results are merged into ``OUT`` (``merge_single``) and the parent
resumes the build from there, exactly as after an interruption. The adapters are the same as a
sequential build's up to floating-point order (a process's thread count can change it). Worth it
when one process cannot keep the device busy: small models on a GPU, or a CPU with spare cores.
A child that fails leaves its task to the parent, which redoes it sequentially (and reports
the error if it recurs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from valora.logger import get_logger
from valora.training.builder import merge_single
from valora.training.checkpoints import STATE_FILE, BuildState
from valora.training.spec import BuildSpec

logger = get_logger(__name__)

PARTS_DIR = "parts"


def parallel_singles(spec_path: Path, spec: BuildSpec, out_dir: Path, base_dir: Path, jobs: int,
                     device: str, threads: int | None) -> None:
    """Train the missing single-task adapters of ``spec`` with up to ``jobs`` child processes and
    merge them into ``out_dir``."""
    done: set[str] = set()
    if (out_dir / STATE_FILE).exists():
        done = set(BuildState.read(out_dir).get("single", {}))
    todo = [t.name for t in spec.tasks if t.name not in done]
    per_child = threads or max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(todo) or 1)))
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            task = queue.pop(0)
            part = out_dir / PARTS_DIR / task
            cmd = [sys.executable, "-m", "valora.training.cli", "build", str(spec_path),
                   "--out", str(part), "--base", str(base_dir), "--single-only", task,
                   "--device", device, "--threads", str(per_child)]
            logger.info("single-task adapter %s: child process %s", task, " ".join(cmd))
            running.append((task, subprocess.Popen(cmd)))
        task, child = running.pop(0)
        code = child.wait()
        part = out_dir / PARTS_DIR / task
        if code == 0 and (part / STATE_FILE).exists():
            merge_single(out_dir, part, task)
        else:
            logger.warning("child for task %s exited with %d; the build redoes it", task, code)
