"""Vision task heads: bounded answers (classification, detection) from one prefill.

The engine calls ``load_task_head(adapter_dir)`` once per adapter, then per request
``head.num_input_tokens`` and ``head.run(hidden) -> HeadResult``. The on-disk format is described
in ``valora.heads.storage`` and ``docs/adapters.md``.
"""

from valora.heads.base import HeadOutputs, TaskHead
from valora.heads.classification import ClassificationHead
from valora.heads.detection import DetectionHead
from valora.heads.matching import DetectionTarget, hungarian_match
from valora.heads.result import Box, HeadResult
from valora.heads.spec import HeadSpec
from valora.heads.storage import (
    HEAD_KINDS,
    build_task_head,
    list_task_heads,
    load_task_head,
    read_head_dir,
    save_task_head,
)

__all__ = [
    "HEAD_KINDS", "Box", "ClassificationHead", "DetectionHead", "DetectionTarget", "HeadOutputs",
    "HeadResult", "HeadSpec", "TaskHead", "build_task_head", "hungarian_match", "list_task_heads",
    "load_task_head", "read_head_dir", "save_task_head",
]
