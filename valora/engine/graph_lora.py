"""Which LoRA work a captured graph replays, and the static LoRA batches it replays it over.

Shared by the decode graphs (``cuda_graph``) and the piecewise graphs (``piecewise_graphs``). A
graph depends on its *variant* only — ``"base"`` (no LoRA), ``"lora"`` and ``"mixed"`` (LoRA +
merged-adapter correction; also a correction alone, with every token slot -1) — never on which
adapters run: its LoRA batches read the token slots from static buffers, and their segments are
rebuilt from them on the device before each replay (``StaticSegments``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from valora.errors import ValoraError
from valora.forward_batch import ForwardBatch
from valora.ops.lora import LoRABatch
from valora.ops.lora_segments import LoRASegments, unhinted_lora_batch

VARIANTS = ("base", "lora", "mixed")


def variant_of(batch: ForwardBatch) -> str:
    """The graph variant serving ``batch``: a correction without per-token LoRA (every row of the
    base model while an adapter is merged) replays ``"mixed"`` with all token slots -1, which
    the LoRA kernels skip — it ran eagerly before (≈ 31 ms instead of ≈ 8 at 7B on an H200)."""
    if correction_slots_of(batch) is not None:
        return "mixed"
    return "base" if batch.lora is None else "lora"


def fusable(batch: ForwardBatch) -> bool:
    """Whether a two-batch mixed step meets the fused op's invariant (``valora.ops.lora``: no
    token of the merged slot's own, every own-adapter token corrected) as far as the host knows:
    the merged slot is not among the tokens' own slots. (The engine's batches always meet it.)"""
    own, correction = batch.lora, batch.lora_correction
    if own is None or correction is None or own.active_slots is None:
        return True
    return not set(own.active_slots) & set(correction.active_slots or ())


def correction_slots_of(batch: ForwardBatch) -> torch.Tensor | None:
    """The step's correction slots: a second batch's, or those inside a fused one
    (``LoRAConfig.fuse_correction``; graphs replay it as two launches, the same sums)."""
    if batch.lora_correction is not None:
        return batch.lora_correction.token_slots
    return batch.lora.correction_slots if batch.lora is not None else None


StaticSegments = tuple[LoRASegments, torch.Tensor, torch.Tensor | None]
"""``(segments, token slots, correction slots or None)``: a graph's LoRA segments and the static
buffers they are rebuilt from before each replay."""


def check_variants(variants: Iterable[str], num_lora_slots: int) -> tuple[str, ...]:
    """``variants`` as a tuple; ``ValoraError`` for an unknown one, or a LoRA variant without
    adapter slots."""
    wanted = tuple(variants)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown or (num_lora_slots == 0 and set(wanted) - {"base"}):
        raise ValoraError(f"variants {wanted} invalid (known {VARIANTS}; LoRA variants need "
                          "num_lora_slots > 0)")
    return wanted


def lora_variant_served(batch: ForwardBatch, num_lora_slots: int, fuse_correction: bool,
                        variants: Sequence[str]) -> bool:
    """Whether graphs captured for ``variants`` over ``num_lora_slots`` slots (with the
    correction fused or not) can replay ``batch``'s LoRA work."""
    for lora in (batch.lora, batch.lora_correction):
        if lora is not None and lora.num_slots != num_lora_slots:
            return False
    if fuse_correction and not fusable(batch):
        return False
    return variant_of(batch) in variants


def static_lora_batch(
    slots: torch.Tensor, num_slots: int, correction: torch.Tensor | None = None
) -> tuple[LoRABatch, StaticSegments]:
    """A ``"triton"`` LoRA batch over the static slot buffer ``slots`` (and ``correction``) for
    graph capture: its segments know nothing of the host's slots (tiles for the worst case), and
    ``(segments, slots, correction)`` says what to rebuild them from before each replay."""
    batch = unhinted_lora_batch(slots, num_slots, correction)
    assert isinstance(batch.backend_data, LoRASegments)
    return batch, (batch.backend_data, slots, correction)


def attach_static_lora(batch: ForwardBatch, variant: str, slots: torch.Tensor,
                       correction: torch.Tensor, num_slots: int, fuse_correction: bool
                       ) -> list[StaticSegments]:
    """Give ``batch`` the LoRA batches of ``variant`` over the static slot buffers (``base``:
    none; ``lora``: the tokens' own; ``mixed``: their own and the merged adapter's correction,
    in one batch with ``fuse_correction``, else two) and return what to rebuild before each
    replay."""
    if variant == "mixed" and fuse_correction:
        batch.lora, entry = static_lora_batch(slots, num_slots, correction)
        return [entry]
    if variant not in ("lora", "mixed"):
        return []
    batch.lora, entry = static_lora_batch(slots, num_slots)
    if variant == "lora":
        return [entry]
    batch.lora_correction, second = static_lora_batch(correction, num_slots)
    return [entry, second]


def fill_lora_slots(batch: ForwardBatch, token_slots: torch.Tensor,
                    correction_slots: torch.Tensor, rows: int, size: int) -> None:
    """Copy ``batch``'s per-row LoRA slots into the static buffers' first ``rows`` entries;
    rows ``rows..size`` (padding) get -1, which the LoRA kernels skip. A step without LoRA
    leaves the buffers alone (its variant, ``base``, reads neither)."""
    correction = correction_slots_of(batch)
    if batch.lora is not None:
        token_slots[:rows].copy_(batch.lora.token_slots)
    elif correction is not None:
        token_slots[:rows].fill_(-1)
    if correction is not None:
        correction_slots[:rows].copy_(correction)
    if size > rows:
        token_slots[rows:size].fill_(-1)
        correction_slots[rows:size].fill_(-1)
