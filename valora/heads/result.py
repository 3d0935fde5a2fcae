"""What a task head returns for one request: a label, per-label scores and (detection) boxes.

Boxes use normalised centre format: ``cx, cy, w, h`` in ``[0, 1]`` relative to the image the
model saw (after the processor's resize/crop), so they do not depend on the input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Box:
    """One detected object. Invariant: coordinates and ``score`` lie in ``[0, 1]``."""

    label: str
    score: float
    cx: float
    cy: float
    w: float
    h: float

    def xyxy(self) -> tuple[float, float, float, float]:
        """Corners ``(x0, y0, x1, y1)``, normalised."""
        half_w, half_h = self.w / 2, self.h / 2
        return (self.cx - half_w, self.cy - half_h, self.cx + half_w, self.cy + half_h)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 6), "cx": round(self.cx, 6),
                "cy": round(self.cy, 6), "w": round(self.w, 6), "h": round(self.h, 6)}


@dataclass(frozen=True)
class HeadResult:
    """A head's answer for one request.

    ``label`` is the text the engine returns as the completion (classification: the top label;
    detection: the kept boxes' labels joined by ``", "`` in descending score order, or ``"none"``).
    ``scores`` maps every label of the head to a probability (classification: softmax over labels;
    detection: each label's best kept-box score, 0.0 when no box of that label was kept).
    """

    kind: str
    label: str
    scores: dict[str, float]
    boxes: list[Box] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``head_result`` field of API responses)."""
        return {"kind": self.kind, "label": self.label,
                "scores": {k: round(v, 6) for k, v in self.scores.items()},
                "boxes": [b.to_dict() for b in self.boxes]}
