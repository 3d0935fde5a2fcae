"""Accuracy of one task kind, in ``[0, 1]``.

- classification and VQA: exact match after normalisation (lower case, punctuation and extra
  spaces removed);
- caption: mean unigram F1 between the normalised prediction and reference;
- detection: F1 at IoU ≥ 0.5 over the split, ``2·TP / (predicted + true boxes)``; each image's
  predictions, in descending score order, are matched greedily to unmatched ground-truth boxes
  of the same label. A split with no boxes at all and no predictions scores 1.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from valora.heads.matching import box_iou, cxcywh_to_xyxy
from valora.heads.result import Box

_PUNCT = re.compile(r"[^\w\s-]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return 0.0
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def unigram_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def caption_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return 0.0
    pairs = zip(predictions, references, strict=True)
    return sum(unigram_f1(p, r) for p, r in pairs) / len(references)


def _to_tensor(boxes: Sequence[Box]) -> torch.Tensor:
    return cxcywh_to_xyxy(torch.tensor([[b.cx, b.cy, b.w, b.h] for b in boxes]).reshape(-1, 4))


def detection_counts(predicted: Sequence[Box], truth: Sequence[Box],
                     iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """``(true positives, number predicted, number of ground-truth boxes)`` for one image."""
    if not predicted or not truth:
        return 0, len(predicted), len(truth)
    ious, _ = box_iou(_to_tensor(predicted), _to_tensor(truth))
    used: set[int] = set()
    hits = 0
    for i in sorted(range(len(predicted)), key=lambda k: -predicted[k].score):
        best, best_iou = -1, iou_threshold
        for j, gt in enumerate(truth):
            if j not in used and gt.label == predicted[i].label and float(ious[i, j]) >= best_iou:
                best, best_iou = j, float(ious[i, j])
        if best >= 0:
            used.add(best)
            hits += 1
    return hits, len(predicted), len(truth)


def detection_f1(predictions: Sequence[Sequence[Box]], truths: Sequence[Sequence[Box]]) -> float:
    hits = num_pred = num_true = 0
    for pred, true in zip(predictions, truths, strict=True):
        h, p, t = detection_counts(pred, true)
        hits, num_pred, num_true = hits + h, num_pred + p, num_true + t
    if num_pred == 0 and num_true == 0:
        return 1.0
    return 2 * hits / (num_pred + num_true)


def text_accuracy(kind: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """The text metric of ``kind`` (caption: unigram F1; the rest: exact match)."""
    return caption_score(predictions, references) if kind == "caption" \
        else exact_match(predictions, references)
