"""Head refit: retrain each head on its task with the adapter's final LoRA frozen.

After a fusion run the shared LoRA has moved to serve the new task, so the hidden states an old
task's head reads have drifted. With the LoRA now fixed, the head's inputs for the training split
are computed once (no gradient) and the head is trained further on them alone — an MLP or a
small decoder over cached tensors, so hundreds of steps cost about one forward pass over the
split. Applied after single-task and fusion runs alike, so their accuracies stay comparable.
"""

from __future__ import annotations

import torch

from valora.heads import TaskHead
from valora.training.backbone import Backbone
from valora.training.encoding import EncodedTask, make_batch
from valora.training.trainer import head_input

BATCH_SIZE = 64


@torch.no_grad()
def cached_head_inputs(backbone: Backbone, enc: EncodedTask, head: TaskHead) -> torch.Tensor:
    """``[n_train, num_input_tokens, hidden]``: the head's inputs for every training example."""
    split = enc.train
    pad = int(backbone.tokenizer.pad_token_id or 0)
    chunks = []
    for start in range(0, len(split), BATCH_SIZE):
        rows = list(range(start, min(start + BATCH_SIZE, len(split))))
        batch = make_batch(split, rows, pad, with_answers=False)
        if split.prefix is not None:
            prefix = torch.nn.utils.rnn.pad_sequence(
                [split.prefix[r][:batch.prompt_lengths[i]] for i, r in enumerate(rows)],
                batch_first=True)
            hidden = backbone.hidden_from_prefix(prefix, batch.mask)
        else:
            hidden = backbone.hidden_states(backbone.embed(batch.ids, batch.features), batch.mask)
        chunks.append(head_input(hidden, batch, head))
    return torch.cat(chunks)


def refit_head(backbone: Backbone, enc: EncodedTask, head: TaskHead, steps: int, lr: float,
               seed: int) -> None:
    """Train ``head`` in place for ``steps`` AdamW steps on cached inputs (seeded batches)."""
    inputs = cached_head_inputs(backbone, enc, head)
    targets = enc.train.targets
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    head.train()
    for _ in range(steps):
        rows = torch.randint(0, len(targets), (BATCH_SIZE,), generator=generator)
        loss = head.loss(head(inputs[rows.to(inputs.device)]), [targets[int(r)] for r in rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    head.eval()
