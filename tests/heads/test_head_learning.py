"""Both head kinds learn a small synthetic problem from hidden states alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from valora.heads import DetectionTarget, HeadSpec, build_task_head
from valora.heads.result import Box
from valora.training.metrics import detection_f1

HIDDEN = 24


def _train(head: torch.nn.Module, inputs: torch.Tensor, targets: list, steps: int, lr: float,
           gen: torch.Generator, batch_size: int = 16) -> None:
    optimizer = torch.optim.AdamW(head.parameters(), lr)
    for _ in range(steps):
        rows = torch.randint(0, len(targets), (batch_size,), generator=gen)
        batch_targets = [targets[int(i)] for i in rows]
        loss = head.loss(head(inputs[rows]), batch_targets)  # type: ignore[operator]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    head.eval()


def test_classification_head_learns_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, HIDDEN, generator=gen) * 2
    labels = torch.randint(0, 3, (400,), generator=gen)
    hidden = centres[labels] + torch.randn(400, HIDDEN, generator=gen)
    # Two input tokens, the signal in the last one: ``last`` pooling must read it.
    inputs = torch.stack([torch.randn(400, HIDDEN, generator=gen), hidden], dim=1)
    torch.manual_seed(0)
    head = build_task_head(HeadSpec(kind="classification", task="clusters", labels=("a", "b", "c"),
                                    hidden_size=HIDDEN, num_input_tokens=2,
                                    params={"mlp_hidden": 32}))
    _train(head, inputs[:300], labels[:300].tolist(), 150, 3e-3, gen)
    with torch.no_grad():
        predicted = head.predict(head(inputs[300:]))  # type: ignore[attr-defined]
    assert float((predicted == labels[300:]).float().mean()) > 0.9
    result = head.run(inputs[300])
    assert result.label == "abc"[int(predicted[0])]


def _scenes(count: int, gen: torch.Generator, code: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Token j of an example linearly encodes object j (box, label); 1-2 objects per example."""
    hidden = torch.randn(count, 4, HIDDEN, generator=gen) * 0.1
    targets = []
    for i in range(count):
        k = int(torch.randint(1, 3, (1,), generator=gen))
        centres = torch.rand(k, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(k, 2, generator=gen) * 0.2 + 0.3
        labels = torch.randint(0, 2, (k,), generator=gen)
        boxes = torch.cat([centres, sizes], dim=1)
        features = torch.cat([boxes, F.one_hot(labels, 2).float(), torch.ones(k, 1)], dim=1)
        hidden[i, :k] += features @ code
        targets.append(DetectionTarget(labels, boxes))
    return hidden, targets


def test_detection_head_learns_boxes() -> None:
    gen = torch.Generator().manual_seed(0)
    code = torch.randn(7, HIDDEN, generator=gen)
    train_x, train_t = _scenes(384, gen, code)
    test_x, test_t = _scenes(96, gen, code)
    torch.manual_seed(0)
    head = build_task_head(HeadSpec(
        kind="detection", task="objects", labels=("cat", "dog"), hidden_size=HIDDEN,
        num_input_tokens=4, params={"dim": 32, "num_heads": 2, "num_queries": 4, "num_layers": 1}))
    _train(head, train_x, train_t, 300, 4e-3, gen, batch_size=32)
    with torch.no_grad():
        outputs = head(test_x)
    predicted = [head.decode(outputs, i).boxes for i in range(len(test_t))]
    truth = [[Box(("cat", "dog")[int(label)], 1.0, *(float(v) for v in box))
              for label, box in zip(t.labels, t.boxes, strict=True)] for t in test_t]
    untrained = build_task_head(head.spec)
    with torch.no_grad():
        baseline = untrained(test_x)
    baseline_boxes = [untrained.decode(baseline, i).boxes for i in range(len(test_t))]
    assert detection_f1(predicted, truth) > 0.75
    assert detection_f1(baseline_boxes, truth) < 0.3
