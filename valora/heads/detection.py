"""Detection head: DETR-style learned box queries cross-attending the trailing hidden states.

Semantics::

    memory  = W_in · layer_norm(hidden) + pos            # [batch, n, dim], pos learned per position
    q       = TransformerDecoder(queries, memory)        # [batch, num_queries, dim] (pre-norm,
                                                         #  self-attn over queries, cross-attn)
    logits  = W_cls · q                                  # [batch, num_queries, num_labels + 1]
    boxes   = sigmoid(MLP(q))                            # [batch, num_queries, 4]  (cx, cy, w, h)

The last class is "no object". At inference a query is kept when its best real label's
probability reaches ``score_threshold``; kept boxes are sorted by descending score, and a box
overlapping a higher-scored box of the same label with IoU above ``nms_iou`` is dropped (a
briefly trained set predictor still emits near-duplicates; ``nms_iou = 1`` disables this).
Training uses the Hungarian set loss of ``valora.heads.matching``.

``params``: ``dim`` (128), ``num_queries`` (8), ``num_heads`` (4), ``num_layers`` (2),
``score_threshold`` (0.5), ``nms_iou`` (0.5), ``no_object_weight`` (training: the weight of the
"no object" class in the cross-entropy, 0.1 as in DETR; raise it when queries are few).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from valora.errors import InvalidAdapterError
from valora.heads.base import HeadOutputs, TaskHead
from valora.heads.matching import DetectionTarget, LossWeights, box_iou, detection_loss
from valora.heads.result import Box, HeadResult
from valora.heads.spec import HeadSpec


class DetectionHead(TaskHead):
    """Up to ``num_queries`` boxes, each with one of ``spec.labels``."""

    kind = "detection"

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__(spec)
        dim = spec.param_int("dim", 128)
        heads = spec.param_int("num_heads", 4)
        self.score_threshold = spec.param_float("score_threshold", 0.5, 0.0, 1.0)
        self.nms_iou = spec.param_float("nms_iou", 0.5, 0.0, 1.0)
        self.loss_weights = LossWeights(
            no_object_weight=spec.param_float("no_object_weight", 0.1, 0.0, 1.0))
        self.norm = nn.LayerNorm(spec.hidden_size)
        self.input_proj = nn.Linear(spec.hidden_size, dim)
        self.position = nn.Parameter(torch.randn(spec.num_input_tokens, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(spec.param_int("num_queries", 8), dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, spec.param_int("num_layers", 2),
                                             norm=nn.LayerNorm(dim))
        self.class_out = nn.Linear(dim, len(spec.labels) + 1)
        self.box_out = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))

    @classmethod
    def check_spec(cls, spec: HeadSpec) -> None:
        if spec.kind != cls.kind:
            raise InvalidAdapterError(
                f"task head {spec.task!r}: kind {spec.kind!r} is not {cls.kind!r}")
        if not spec.labels:
            raise InvalidAdapterError(f"task head {spec.task!r}: a detection head needs labels")
        dim, heads = spec.param_int("dim", 128), spec.param_int("num_heads", 4)
        if dim % heads:
            raise InvalidAdapterError(
                f"task head {spec.task!r}: params.dim ({dim}) must be divisible by "
                f"num_heads ({heads})")
        spec.param_int("num_queries", 8)
        spec.param_int("num_layers", 2)
        spec.param_float("score_threshold", 0.5, 0.0, 1.0)
        spec.param_float("nms_iou", 0.5, 0.0, 1.0)
        spec.param_float("no_object_weight", 0.1, 0.0, 1.0)

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[0])

    def forward(self, hidden: torch.Tensor) -> HeadOutputs:
        memory = self.input_proj(self.norm(hidden)) + self.position[-hidden.shape[1]:]
        queries = self.queries.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        decoded = self.decoder(queries, memory)
        return {"logits": self.class_out(decoded), "boxes": self.box_out(decoded).sigmoid()}

    def loss(self, outputs: HeadOutputs, targets: Sequence[DetectionTarget]) -> torch.Tensor:
        return detection_loss(outputs["logits"], outputs["boxes"], targets, self.loss_weights)

    def decode(self, outputs: HeadOutputs, index: int) -> HeadResult:
        probs = outputs["logits"][index].float().softmax(dim=-1)[:, :-1]
        best, label_idx = probs.max(dim=-1)
        boxes: list[Box] = []
        for q in range(probs.shape[0]):
            score = float(best[q])
            if score >= self.score_threshold:
                cx, cy, w, h = (float(v) for v in outputs["boxes"][index, q].clamp(0.0, 1.0))
                boxes.append(Box(self.labels[int(label_idx[q])], score, cx, cy, w, h))
        boxes = self._suppress(sorted(boxes, key=lambda b: -b.score))
        scores = dict.fromkeys(self.labels, 0.0)
        for box in boxes:
            scores[box.label] = max(scores[box.label], box.score)
        label = ", ".join(b.label for b in boxes) if boxes else "none"
        return HeadResult(kind=self.kind, label=label, scores=scores, boxes=boxes)

    def _suppress(self, boxes: list[Box]) -> list[Box]:
        """Greedy per-label non-maximum suppression over score-sorted ``boxes``."""
        if self.nms_iou >= 1.0 or len(boxes) < 2:
            return boxes
        corners = torch.tensor([b.xyxy() for b in boxes])
        overlap, _ = box_iou(corners, corners)
        kept: list[int] = []
        for i, box in enumerate(boxes):
            clear = (boxes[j].label != box.label or float(overlap[i, j]) <= self.nms_iou
                     for j in kept)
            if all(clear):
                kept.append(i)
        return [boxes[i] for i in kept]
