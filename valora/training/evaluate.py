"""Validation accuracy of a task: through its head (bounded tasks of an adapter) or by greedy
decoding (VQA, caption, and every task on the base model, which has no heads).

The base model's detection accuracy is the F1 of predicting no box (it cannot output boxes),
i.e. 0 whenever the split has objects; its classification accuracy is exact match of the decoded
text against the label.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from valora.heads import ClassificationHead, DetectionHead, TaskHead
from valora.heads.matching import DetectionTarget
from valora.heads.result import Box
from valora.training.backbone import Backbone
from valora.training.encoding import EncodedSplit, EncodedTask, make_batch
from valora.training.metrics import detection_f1, text_accuracy
from valora.training.trainer import head_input


def _pad(backbone: Backbone) -> int:
    pad = backbone.tokenizer.pad_token_id
    return int(pad if pad is not None else 0)


def truth_boxes(target: DetectionTarget, labels: tuple[str, ...]) -> list[Box]:
    return [Box(labels[int(label)], 1.0, *(float(v) for v in box))
            for label, box in zip(target.labels, target.boxes, strict=True)]


@torch.no_grad()
def head_accuracy(backbone: Backbone, enc: EncodedTask, head: TaskHead, batch_size: int) -> float:
    split = enc.validation
    correct, predicted_boxes = 0, []
    for start in range(0, len(split), batch_size):
        rows = list(range(start, min(start + batch_size, len(split))))
        batch = make_batch(split, rows, _pad(backbone), with_answers=False)
        hidden = backbone.hidden_states(backbone.embed(batch.ids, batch.features), batch.mask)
        outputs = head(head_input(hidden, batch, head))
        if isinstance(head, ClassificationHead):
            predicted = head.predict(outputs).tolist()
            correct += sum(int(p == t) for p, t in zip(predicted, batch.targets, strict=True))
        elif isinstance(head, DetectionHead):
            predicted_boxes += [head.decode(outputs, i).boxes for i in range(len(rows))]
    if isinstance(head, DetectionHead):
        truths = [truth_boxes(t, enc.labels) for t in split.targets]
        return detection_f1(predicted_boxes, truths)
    return correct / max(len(split), 1)


@torch.no_grad()
def decode_split(backbone: Backbone, split: EncodedSplit, max_new_tokens: int,
                 batch_size: int) -> list[str]:
    """Greedy answers for every row (rows grouped by prompt length, so no padding is needed)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for row, prompt in enumerate(split.prompt_ids):
        by_length[len(prompt)].append(row)
    texts = [""] * len(split)
    for rows_all in by_length.values():
        for start in range(0, len(rows_all), batch_size):
            rows = rows_all[start:start + batch_size]
            ids = torch.tensor([split.prompt_ids[r] for r in rows], device=split.features.device)
            for row, tokens in zip(rows, backbone.greedy(ids, split.features[rows], max_new_tokens),
                                   strict=True):
                texts[row] = backbone.decode_text(tokens)
    return texts


def text_path_accuracy(backbone: Backbone, enc: EncodedTask, max_new_tokens: int,
                       batch_size: int, max_examples: int | None = None) -> float:
    """Accuracy of decoded answers (detection: exact match of the label list text) on the first
    ``max_examples`` validation rows. Decoding stops two tokens after the longest reference
    answer (a longer output cannot match it exactly) or at ``max_new_tokens``."""
    split = enc.validation if max_examples is None else enc.validation.first(max_examples)
    if enc.task.kind != "caption":
        max_new_tokens = min(max_new_tokens, max(len(a) for a in split.answer_ids) + 2)
    texts = decode_split(backbone, split, max_new_tokens, batch_size)
    kind = "caption" if enc.task.kind == "caption" else "vqa"
    return text_accuracy(kind, texts, split.answers)


def task_accuracy(backbone: Backbone, enc: EncodedTask, head: TaskHead | None,
                  max_new_tokens: int, batch_size: int) -> float:
    """The task's accuracy with the LoRA currently loaded in ``backbone``."""
    if head is not None:
        return head_accuracy(backbone, enc, head, batch_size)
    return text_path_accuracy(backbone, enc, max_new_tokens, batch_size)


def base_accuracy(backbone: Backbone, enc: EncodedTask, max_new_tokens: int,
                  batch_size: int) -> float:
    """The plain base model's accuracy (LoRA disabled, no head)."""
    if enc.task.kind == "detection":
        truths = [truth_boxes(t, enc.labels) for t in enc.validation.targets]
        return detection_f1([[] for _ in truths], truths)
    with backbone.lora_disabled():
        return text_path_accuracy(backbone, enc, max_new_tokens, batch_size)
