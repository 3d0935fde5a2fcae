"""Training loop of the default model: AdamW, linear warm-up, cosine decay, resumable.

Step ``k`` trains on stream examples ``k·batch_size … (k+1)·batch_size − 1`` of
``default_data``, so a run is a pure function of (spec, config) up to floating-point
non-associativity across thread counts. Every ``checkpoint_every`` steps the model, optimiser and
step are written to ``work_dir/checkpoint.pt``; a later call with the same ``work_dir`` resumes
from there and produces the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from valora.logger import get_logger
from valora.training.default_aux import AuxHeads
from valora.training.default_data import make_batch
from valora.training.default_model import DefaultModelSpec, init_model

logger = get_logger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs (the defaults are the shipped model's recipe)."""

    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    max_turns: int = 6
    learning_rate: float = 1.5e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 60
    # An optional second cosine cycle after ``steps`` (``learning_rate`` is then
    # ``second_cycle_learning_rate`` decaying to ``min_learning_rate``); 0 steps = none.
    second_cycle_steps: int = 0
    second_cycle_learning_rate: float = 4e-4
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 1.0  # weight of the dense image-token loss (default_aux); 0 disables
    log_every: int = 25
    checkpoint_every: int = 200
    device: str = "cpu"

    @property
    def total_steps(self) -> int:
        return self.steps + self.second_cycle_steps


def _cosine(high: float, low: float, progress: float) -> float:
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``learning_rate``, cosine decay to ``min_learning_rate`` at ``steps``,
    then (if any) a second cosine cycle from ``second_cycle_learning_rate``."""
    if step >= config.steps:
        progress = (step - config.steps) / max(1, config.second_cycle_steps)
        return _cosine(config.second_cycle_learning_rate, config.min_learning_rate, progress)
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return _cosine(config.learning_rate, config.min_learning_rate, progress)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.98), eps=1e-8)


def train(
    spec: DefaultModelSpec,
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerFast,
    work_dir: Path,
) -> LlavaForConditionalGeneration:
    """Train from scratch (or resume from ``work_dir``) and return the float32 model in eval mode."""
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint.pt"
    model = init_model(spec, tokenizer, config.seed)
    torch.nn.Module.to(model, device=config.device)  # in place (transformers' ``to`` is mistyped)
    aux = AuxHeads(spec.hidden_size, spec.image_size // spec.patch_size).to(config.device)
    trained = torch.nn.ModuleDict({"model": model, "aux": aux})
    optimizer = _optimizer(trained, config)
    captured: dict[str, torch.Tensor] = {}
    model.model.multi_modal_projector.register_forward_hook(
        lambda _module, _inputs, output: captured.__setitem__("image_embeds", output))
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=config.device, weights_only=True)
        trained.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        logger.info("resuming from step %d (%s)", start, checkpoint)
    began, running, running_aux = time.monotonic(), 0.0, 0.0
    for step in range(start, config.total_steps):
        indices = range(step * config.batch_size, (step + 1) * config.batch_size)
        batch = make_batch(tokenizer, config.seed, indices, spec.image_size, spec.patch_size,
                           config.max_turns)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        out = model(input_ids=batch.input_ids.to(config.device),
                    attention_mask=batch.attention_mask.to(config.device),
                    position_ids=batch.position_ids.to(config.device),
                    pixel_values=batch.pixel_values.to(config.device),
                    labels=batch.labels.to(config.device))
        aux_loss = aux.loss(captured.pop("image_embeds"), batch.patch_targets.to(config.device))
        optimizer.zero_grad(set_to_none=True)
        (out.loss + config.aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip)
        optimizer.step()
        running = 0.9 * running + 0.1 * float(out.loss) if step > start else float(out.loss)
        running_aux = 0.9 * running_aux + 0.1 * float(aux_loss) if step > start else float(aux_loss)
        if (step + 1) % config.log_every == 0 or step + 1 == config.total_steps:
            elapsed = time.monotonic() - began
            logger.info("step %d/%d loss %.4f aux %.4f lr %.2e elapsed %.0fs", step + 1,
                        config.total_steps, running, running_aux, learning_rate(config, step),
                        elapsed)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.total_steps:
            state = {"model": trained.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step + 1}
            torch.save(state, work_dir / "checkpoint.tmp")
            (work_dir / "checkpoint.tmp").replace(checkpoint)
    return model.eval()
