"""Box geometry, Hungarian matching (against brute force) and the set loss."""

from __future__ import annotations

import itertools

import pytest
import torch

from valora.heads.matching import (
    DetectionTarget,
    LossWeights,
    box_iou,
    cxcywh_to_xyxy,
    detection_loss,
    generalized_iou,
    hungarian_match,
)


def _cost(logits: torch.Tensor, boxes: torch.Tensor, target: DetectionTarget,
          w: LossWeights) -> torch.Tensor:
    probs = logits.softmax(-1)[:, target.labels]
    l1 = torch.cdist(boxes, target.boxes, p=1)
    giou = generalized_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target.boxes))
    return -w.class_weight * probs + w.l1_weight * l1 + w.giou_weight * (1 - giou)


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_queries, num_gt = 5, 1 + seed % 4
    logits = torch.randn(num_queries, 4, generator=gen)
    boxes = torch.rand(num_queries, 4, generator=gen) * 0.5 + 0.1
    target = DetectionTarget(torch.randint(0, 3, (num_gt,), generator=gen),
                             torch.rand(num_gt, 4, generator=gen) * 0.5 + 0.1)
    cost = _cost(logits, boxes, target, LossWeights())
    best = min(sum(float(cost[q, j]) for j, q in enumerate(perm))
               for perm in itertools.permutations(range(num_queries), num_gt))
    query_idx, gt_idx = hungarian_match(logits, boxes, target)
    assert len(set(query_idx.tolist())) == num_gt and sorted(gt_idx.tolist()) == list(range(num_gt))
    assert float(cost[query_idx, gt_idx].sum()) == pytest.approx(best, abs=1e-5)
    assert query_idx.tolist() == sorted(query_idx.tolist())


def test_match_with_no_objects_is_empty() -> None:
    target = DetectionTarget(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    q, g = hungarian_match(torch.randn(3, 2), torch.rand(3, 4), target)
    assert q.numel() == 0 and g.numel() == 0


def test_iou_and_giou_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou, _ = box_iou(a, b)
    assert iou[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0])
    giou = generalized_iou(a, b)[0]
    assert float(giou[1]) == pytest.approx(1.0)
    assert float(giou[0]) == pytest.approx(1 / 7 - (9 - 7) / 9)
    assert float(giou[2]) < 0  # disjoint boxes are penalised by their distance
    assert cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx(
        [0.4, 0.3, 0.6, 0.7])


def test_loss_prefers_correct_predictions() -> None:
    target = DetectionTarget(torch.tensor([1]), torch.tensor([[0.3, 0.4, 0.2, 0.2]]))
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, :, 2] = 5.0  # every query says "no object"
    logits[0, 1, 2], logits[0, 1, 1] = -5.0, 5.0  # query 1 says label 1
    good = torch.tensor([[[0.8, 0.8, 0.1, 0.1], [0.3, 0.4, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    bad = good.clone()
    bad[0, 1] = torch.tensor([0.7, 0.2, 0.1, 0.3])
    good_loss = detection_loss(logits, good, [target])
    assert float(good_loss) < 0.05
    assert float(detection_loss(logits, bad, [target])) > float(good_loss) + 1.0


def test_target_shape_checked() -> None:
    with pytest.raises(ValueError, match="labels"):
        DetectionTarget(torch.tensor([1, 2]), torch.zeros(3, 4))
