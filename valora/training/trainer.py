"""Train one adapter (a LoRA plus a head per bounded task) on one or more tasks.

Each optimisation step draws a batch from one task. A single-task run spends every step on its
task; a fusion run (``new_task`` joining an adapter that already serves ``old`` tasks) starts
from the adapter's weights and alternates: every other step trains the new task, the others
cycle through the old tasks (replay), so the LoRA learns the new task without forgetting.

Loss of a step: bounded tasks ``head_loss + text_loss_weight · text_loss`` (the text loss teaches
the adapter to also *decode* the label, for clients that do not use the head); VQA and caption
tasks ``text_loss``. ``text_loss`` is cross-entropy on the answer tokens (and end-of-sequence).
AdamW, linear warm-up over 10 % of the steps then cosine decay, gradient norm clipped at 1.0.
Everything random is seeded from the step's seed, so a run is reproducible on its own.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from valora.heads import HeadSpec, TaskHead, build_task_head
from valora.training.backbone import Backbone
from valora.training.encoding import Batch, EncodedTask, make_batch
from valora.training.spec import TrainingSpec


@dataclass
class AdapterState:
    """An adapter in memory: its member tasks (in fusion order), LoRA tensors (PEFT state-dict
    keys) and the heads of its bounded tasks."""

    tasks: tuple[str, ...]
    lora: dict[str, torch.Tensor]
    heads: dict[str, TaskHead]


def new_head(enc: EncodedTask, backbone: Backbone, seed: int) -> TaskHead:
    """A fresh head for a bounded task. Detection heads, and classification heads with ``mean``
    pooling, read the prompt from its first image token on by default (every image feature is
    in their window); ``last`` pooling reads the last prompt token."""
    options = dict(enc.task.head)
    prompt = enc.train.prompt_ids[0]
    pooling = str(options.pop("pooling", "last"))
    if enc.task.kind == "detection" or pooling == "mean":
        default_window = len(prompt) - prompt.index(backbone.image_token_id)
    else:
        default_window = 1
    spec = HeadSpec(kind=enc.task.kind, task=enc.task.name, labels=enc.labels,
                    hidden_size=backbone.hidden_size,
                    num_input_tokens=int(options.pop("num_input_tokens", default_window)),
                    pooling=pooling, params=options)
    torch.manual_seed(seed)
    return build_task_head(spec).to(backbone.device)


class _RowSampler:
    """Endless seeded epochs over a split's row indices."""

    def __init__(self, size: int, seed: str) -> None:
        self.size, self.rng, self.order = size, random.Random(seed), list[int]()

    def take(self, count: int) -> list[int]:
        rows: list[int] = []
        while len(rows) < count:
            if not self.order:
                self.order = list(range(self.size))
                self.rng.shuffle(self.order)
            rows.append(self.order.pop())
        return rows


def _schedule(new_task: str, old: tuple[str, ...], steps: int) -> list[str]:
    if not old:
        return [new_task] * steps
    return [new_task if i % 2 == 0 else old[(i // 2) % len(old)] for i in range(steps)]


def text_loss(backbone: Backbone, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    rows, cols, targets = [], [], []
    for i, (start, answer) in enumerate(zip(batch.prompt_lengths, batch.answer_ids, strict=True)):
        for j, token in enumerate(answer):
            rows.append(i)
            cols.append(start + j - 1)
            targets.append(token)
    device = hidden.device
    logits = backbone.lm_head(hidden[torch.tensor(rows, device=device),
                                     torch.tensor(cols, device=device)])
    return F.cross_entropy(logits, torch.tensor(targets, device=device))


def head_input(hidden: torch.Tensor, batch: Batch, head: TaskHead) -> torch.Tensor:
    """``[b, num_input_tokens, h]``: each row's last prompt positions."""
    n = head.num_input_tokens
    return torch.stack([hidden[i, end - n:end] for i, end in enumerate(batch.prompt_lengths)])


def step_loss(backbone: Backbone, enc: EncodedTask, head: TaskHead | None, batch: Batch,
              text_weight: float) -> torch.Tensor:
    if batch.prefix is not None:
        hidden = backbone.hidden_from_prefix(batch.prefix, batch.mask)
    else:
        hidden = backbone.hidden_states(backbone.embed(batch.ids, batch.features), batch.mask)
    if head is None:
        return text_loss(backbone, hidden, batch)
    loss = head.loss(head(head_input(hidden, batch, head)), batch.targets)
    if text_weight > 0:
        loss = loss + text_weight * text_loss(backbone, hidden, batch)
    return loss


def train_adapter(backbone: Backbone, tasks: Mapping[str, EncodedTask], init: AdapterState | None,
                  new_task: str, steps: int, spec: TrainingSpec, seed: int,
                  warm_heads: Mapping[str, TaskHead] | None = None) -> AdapterState:
    """Train ``new_task`` into ``init`` (``None``: a fresh adapter) for ``steps`` steps."""
    old = init.tasks if init is not None else ()
    if init is None:
        backbone.reset_lora(seed)
        heads: dict[str, TaskHead] = {}
    else:
        backbone.load_lora_state(init.lora)
        heads = {name: copy.deepcopy(h).to(backbone.device) for name, h in init.heads.items()}
    enc_new = tasks[new_task]
    if enc_new.task.bounded:
        warm = (warm_heads or {}).get(new_task)
        heads[new_task] = (new_head(enc_new, backbone, seed) if warm is None
                           else copy.deepcopy(warm).to(backbone.device))
    lora_params = backbone.lora_parameters()
    head_params = [p for h in heads.values() for p in h.parameters()]
    groups: list[dict[str, object]] = [{"params": lora_params, "lr": spec.learning_rate}]
    if head_params:
        groups.append({"params": head_params, "lr": spec.head_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=spec.weight_decay)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return min(1.0, (step + 1) / warmup) * decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    samplers = {t: _RowSampler(len(tasks[t].train), f"{seed}:{t}") for t in (*old, new_task)}
    torch.manual_seed(seed)
    pad = int(backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0)
    for head in heads.values():
        head.train()
    backbone.model.train()  # only LoRA dropout (if configured) depends on the mode
    desc = f"train {new_task}" + (f" into [{', '.join(old)}]" if old else "")
    for task_name in tqdm(_schedule(new_task, old, steps), desc=desc, leave=False):
        enc = tasks[task_name]
        batch = make_batch(enc.train, samplers[task_name].take(spec.batch_size), pad)
        loss = step_loss(backbone, enc, heads.get(task_name), batch,
                         spec.text_loss_weight if enc.task.bounded else 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + head_params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    backbone.model.eval()
    for head in heads.values():
        head.eval()
    return AdapterState((*old, new_task), backbone.lora_state(), heads)
