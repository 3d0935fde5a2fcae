"""Box geometry, Hungarian matching and the DETR set loss.

Boxes are normalised ``(cx, cy, w, h)``. For one image with ``q`` predictions and ``k`` ground-
truth objects, matching solves

    argmin over injective σ: {gt} → {queries}  Σ_j  C[σ(j), j]
    C[i, j] = -w_class · p_i(label_j) + w_l1 · |box_i - gt_j|_1 + w_giou · (1 - GIoU(box_i, gt_j))

with ``scipy.optimize.linear_sum_assignment``. The loss is cross-entropy over all queries
(unmatched ones target the extra "no object" class, down-weighted by ``no_object_weight``) plus,
over matched pairs, ``w_l1 · L1 + w_giou · (1 - GIoU)`` averaged over the batch's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class DetectionTarget:
    """Ground truth of one image: ``labels [k]`` (indices) and ``boxes [k, 4]`` (cx, cy, w, h)."""

    labels: torch.Tensor
    boxes: torch.Tensor

    def __post_init__(self) -> None:
        shapes_ok = self.boxes.dim() == 2 and self.boxes.shape[1] == 4
        if not shapes_ok or self.labels.shape != self.boxes.shape[:1]:
            raise ValueError(f"labels [k] and boxes [k, 4] expected, got {list(self.labels.shape)} "
                             f"and {list(self.boxes.shape)}")


@dataclass(frozen=True)
class LossWeights:
    """DETR's defaults."""

    class_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    no_object_weight: float = 0.1


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes ``a [n, 4]``, ``b [m, 4]`` → ``[n, m]`` each."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes ``[n, 4]`` × ``[m, 4]`` → ``[n, m]``, in ``[-1, 1]``."""
    iou, union = box_iou(a, b)
    top_left = torch.min(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, target: DetectionTarget,
                    weights: LossWeights = LossWeights()) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment for one image.

    ``logits [q, num_labels + 1]``, ``boxes [q, 4]`` → ``(query_idx, gt_idx)``, each ``[min(q, k)]``
    long tensors, sorted by ``query_idx``. No gradient flows through the assignment.
    """
    num_gt = int(target.labels.numel())
    if num_gt == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    with torch.no_grad():
        probs = logits.float().softmax(dim=-1)[:, target.labels]
        l1 = torch.cdist(boxes.float(), target.boxes.float(), p=1)
        giou = generalized_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target.boxes.float()))
        cost = (-weights.class_weight * probs + weights.l1_weight * l1
                + weights.giou_weight * (1 - giou))
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = rows.argsort()
    return (torch.as_tensor(rows[order], dtype=torch.long),
            torch.as_tensor(cols[order], dtype=torch.long))


def detection_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[DetectionTarget],
                   weights: LossWeights = LossWeights()) -> torch.Tensor:
    """Set loss over a batch: ``logits [b, q, num_labels + 1]``, ``boxes [b, q, 4]``."""
    batch, num_queries, num_classes = logits.shape
    no_object = num_classes - 1
    class_target = torch.full((batch, num_queries), no_object, dtype=torch.long,
                              device=logits.device)
    matched_pred: list[torch.Tensor] = []
    matched_gt: list[torch.Tensor] = []
    for i, target in enumerate(targets):
        query_idx, gt_idx = hungarian_match(logits[i], boxes[i], target, weights)
        class_target[i, query_idx] = target.labels[gt_idx].to(logits.device)
        matched_pred.append(boxes[i, query_idx])
        matched_gt.append(target.boxes[gt_idx].to(boxes.device, boxes.dtype))
    class_weights = torch.ones(num_classes, device=logits.device)
    class_weights[no_object] = weights.no_object_weight
    loss = weights.class_weight * F.cross_entropy(
        logits.reshape(-1, num_classes), class_target.reshape(-1), weight=class_weights)
    pred = torch.cat(matched_pred)
    if pred.numel() == 0:
        return loss
    gt = torch.cat(matched_gt)
    num_objects = max(1, gt.shape[0])
    l1 = F.l1_loss(pred, gt, reduction="sum") / num_objects
    giou = torch.diagonal(generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)))
    return loss + weights.l1_weight * l1 + weights.giou_weight * (1 - giou).sum() / num_objects
