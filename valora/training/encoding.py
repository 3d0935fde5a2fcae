"""Examples → token ids, cached image features and targets; index lists → padded batches.

A sequence is ``prompt_ids + answer_ids`` (answer ids end with end-of-sequence). Bounded tasks
read their head input from the last ``num_input_tokens`` *prompt* positions, which precede the
answer, so causal attention makes the head's input independent of the answer tokens.

When the LoRA leaves the lower decoder layers alone, the training split also caches each
sequence's hidden states entering the first adapted layer (``prefix``): training then runs only
the adapted layers, with identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from valora.heads.matching import DetectionTarget
from valora.training.backbone import Backbone
from valora.training.data import Example, TaskData
from valora.training.spec import TaskSpec


@dataclass
class EncodedSplit:
    """One split of one task. ``targets``: label index (classification), ``DetectionTarget``
    (detection) or answer text (VQA/caption); ``answers``: the answer text of every example."""

    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    features: torch.Tensor
    targets: list[Any]
    answers: list[str]
    prefix: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def first(self, count: int) -> EncodedSplit:
        """The first ``count`` rows (all when fewer)."""
        prefix = self.prefix[:count] if self.prefix is not None else None
        return EncodedSplit(self.prompt_ids[:count], self.answer_ids[:count], self.features[:count],
                            self.targets[:count], self.answers[:count], prefix)


@dataclass
class EncodedTask:
    task: TaskSpec
    labels: tuple[str, ...]
    train: EncodedSplit
    validation: EncodedSplit


@dataclass
class Batch:
    """Right-padded rows of one task: ``ids [b, L]``, ``mask [b, L]``, ``features [b, N, h]``."""

    ids: torch.Tensor
    mask: torch.Tensor
    features: torch.Tensor
    prompt_lengths: list[int]
    answer_ids: list[list[int]]
    targets: list[Any]
    prefix: torch.Tensor | None = None


def answer_text(example: Example, labels: tuple[str, ...]) -> str:
    """The text an adapter should decode for ``example`` (detection: labels of its boxes)."""
    if isinstance(example.target, str):
        return example.target
    return ", ".join(box.label for box in example.target) if example.target else "none"


def _target(example: Example, task: TaskSpec, labels: tuple[str, ...]) -> Any:
    if task.kind == "classification":
        assert isinstance(example.target, str)
        return labels.index(example.target)
    if task.kind == "detection":
        assert not isinstance(example.target, str)
        boxes = [(b.cx, b.cy, b.w, b.h) for b in example.target]
        return DetectionTarget(
            torch.tensor([labels.index(b.label) for b in example.target], dtype=torch.long),
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return answer_text(example, labels)


def encode_split(backbone: Backbone, task: TaskSpec, labels: tuple[str, ...],
                 examples: Sequence[Example], desc: str, batch_size: int = 64) -> EncodedSplit:
    prompt_cache: dict[str, list[int]] = {}
    prompts, answers_ids, answers = [], [], []
    for ex in examples:
        text = task.prompt.replace("{question}", ex.question or "")
        if text not in prompt_cache:
            prompt_cache[text] = backbone.prompt_ids(text)
        answer = answer_text(ex, labels)
        prompts.append(prompt_cache[text])
        answers_ids.append(backbone.answer_ids(text, answer))
        answers.append(answer)
    chunks = [backbone.image_features([ex.image for ex in examples[i:i + batch_size]])
              for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False)]
    features = torch.cat(chunks) if chunks else torch.zeros(
        0, backbone.num_image_tokens, backbone.hidden_size, device=backbone.device)
    targets = [_target(ex, task, labels) for ex in examples]
    return EncodedSplit(prompts, answers_ids, features, targets, answers)


def cache_prefix(backbone: Backbone, split: EncodedSplit, batch_size: int = 64) -> None:
    """Fill ``split.prefix`` (no-op when every decoder layer is adapted)."""
    if backbone.first_adapted_layer == 0 or split.prefix is not None:
        return
    pad = int(backbone.tokenizer.pad_token_id or 0)
    prefix: list[torch.Tensor] = []
    for start in range(0, len(split), batch_size):
        rows = list(range(start, min(start + batch_size, len(split))))
        batch = make_batch(split, rows, pad)
        states = backbone.prefix_states(backbone.embed(batch.ids, batch.features), batch.mask)
        lengths = batch.mask.sum(dim=1).tolist()
        prefix += [states[i, :n].clone() for i, n in enumerate(lengths)]
    split.prefix = prefix


def encode_task(backbone: Backbone, data: TaskData) -> EncodedTask:
    name = data.task.name
    train = encode_split(backbone, data.task, data.labels, data.train, f"encode {name} train")
    cache_prefix(backbone, train)
    return EncodedTask(
        data.task, data.labels, train,
        encode_split(backbone, data.task, data.labels, data.validation, f"encode {name} val"))


def make_batch(split: EncodedSplit, rows: Sequence[int], pad_id: int,
               with_answers: bool = True) -> Batch:
    """Rows ``rows`` of ``split``; sequences are prompt (+ answer when ``with_answers``).
    Tensors are on the device of ``split.features`` (the backbone's)."""
    seqs = [split.prompt_ids[r] + (split.answer_ids[r] if with_answers else []) for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    device = split.features.device
    prefix = None
    if split.prefix is not None and with_answers:
        prefix = torch.zeros(len(rows), width, split.prefix[0].shape[-1], device=device)
        for i, r in enumerate(rows):
            prefix[i, :split.prefix[r].shape[0]] = split.prefix[r]
    return Batch(ids.to(device), mask.to(device), split.features[list(rows)], [len(split.prompt_ids[r]) for r in rows],
                 [split.answer_ids[r] for r in rows], [split.targets[r] for r in rows], prefix)
