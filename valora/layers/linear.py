"""The one LoRA-aware linear layer: several projections fused into one weight.

A ``FusedLinear`` holds the rows of ``len(slice_widths)`` projections that read the same input
(q/k/v, or gate/up) stacked into one ``weight`` of shape ``[sum(slice_widths), in_features]``.
Slice ``j`` owns rows ``sum(slice_widths[:j]) : sum(slice_widths[:j + 1])`` and is known to the
checkpoint loader and to adapters by ``slice_names[j]`` (the PEFT module name, e.g. ``q_proj``).

Semantics of ``forward(x, lora, lora_correction)``::

    y = x @ weight.T + bias
    if lora_weights is allocated and lora is not None:  y += LoRA(x; token slots of lora)
    if lora_weights is allocated and lora_correction is not None:
        y -= LoRA(x; token slots of lora_correction)        # mixed mode: undo the merged adapter

The LoRA terms are computed by ``valora.ops.lora_apply`` on the slot storage in
``lora_weights`` (layout in ``valora.ops.lora``); rows whose slot is ``-1`` are untouched.

On CUDA, a call of at most ``lora_overlap_tokens`` tokens computes the LoRA terms into a
separate buffer on a side stream while the base GEMM runs, then adds it (``lora_overlap``; the
same value up to one rounding of the delta to the activation dtype). ``0`` (the default) runs
them in series after the GEMM.

``forward(x, lora, lora_correction, lora_into=t)`` adds the LoRA terms into ``t`` (in place,
``[T, out_features]``) instead of the output, which is then ``x Wᵀ + b`` alone: for a caller
that adds the output to ``t`` next anyway (``o_proj`` / ``down_proj`` and the residual,
``lora_overlap``, "Deltas folded into the next op"). Overlapped, the side stream writes ``t``
directly: no delta buffer, no add. ``forward_with_delta`` returns ``(y, δ)`` with the overlapped
delta not yet added (``δ`` None where it is already in ``y``), for a caller whose next op adds it.

The base GEMM is ``valora.ops.skinny_gemm.base_linear``: ``F.linear``, except for CUDA calls of at
most 32 rows in fp16 / bf16 (decode steps) on Hopper, which take a Triton skinny GEMM (measured
faster than cuBLAS there; ``VALORA_SKINNY_GEMM`` switches it).
"""

from __future__ import annotations

import torch
from torch import nn

from valora.layers.lora_overlap import lora_side_stream
from valora.ops.lora import LoRABatch, LoRASlotWeights, lora_apply
from valora.ops.skinny_gemm import base_linear


class FusedLinear(nn.Module):
    """``y = x Wᵀ + b`` over fused slices, plus each token's adapter delta (see module doc)."""

    def __init__(
        self,
        in_features: int,
        slice_widths: tuple[int, ...],
        bias: bool,
        slice_names: tuple[str, ...],
    ) -> None:
        super().__init__()
        if len(slice_widths) != len(slice_names) or not slice_widths:
            raise ValueError(f"slice_widths {slice_widths} and slice_names {slice_names} must "
                             "be non-empty and of equal length")
        self.in_features = in_features
        self.slice_widths = tuple(int(w) for w in slice_widths)
        self.slice_names = tuple(slice_names)
        self.out_features = sum(self.slice_widths)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None)
        self.lora_weights: LoRASlotWeights | None = None
        self.lora_overlap_tokens = 0
        self.lora_stream_priority = 0

    def slice_rows(self, index: int) -> slice:
        """Rows of ``weight`` (and ``bias``) that belong to slice ``index``."""
        start = sum(self.slice_widths[:index])
        return slice(start, start + self.slice_widths[index])

    def slice_index(self, name: str) -> int:
        """Position of the slice called ``name`` (``ValueError`` if absent)."""
        return self.slice_names.index(name)

    def init_lora_slots(
        self, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device | str
    ) -> LoRASlotWeights:
        """Allocate empty (rank-0) adapter slot storage for this layer and return it."""
        self.lora_weights = LoRASlotWeights.empty(
            num_slots, max_rank, self.in_features, self.slice_widths, dtype, device)
        return self.lora_weights

    def forward(
        self,
        x: torch.Tensor,
        lora: LoRABatch | None = None,
        lora_correction: LoRABatch | None = None,
        lora_into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights = self.lora_weights
        if weights is None or (lora is None and lora_correction is None):
            return base_linear(x, self.weight, self.bias)
        if lora_into is not None and (lora_into.shape != (x.shape[0], self.out_features)
                                      or lora_into.dtype != x.dtype
                                      or lora_into.device != x.device):
            raise ValueError(f"lora_into {tuple(lora_into.shape)} {lora_into.dtype} on "
                             f"{lora_into.device} must be [{x.shape[0]}, {self.out_features}] "
                             f"{x.dtype} on {x.device}")
        if self._overlaps(x):
            y, delta = self._overlapped(x, weights, lora, lora_correction, lora_into)
            return y if lora_into is not None else y.add_(delta)
        y = base_linear(x, self.weight, self.bias)
        _add_lora(y if lora_into is None else lora_into, x, weights, lora, lora_correction)
        return y

    def forward_with_delta(self, x: torch.Tensor, lora: LoRABatch | None = None,
                           lora_correction: LoRABatch | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y, δ)`` with ``y + δ`` = ``forward(x, lora, lora_correction)``: on the overlapped
        path ``δ`` is the side stream's delta, not added (the side stream has been joined); on
        every other path the delta is in ``y`` and ``δ`` is None."""
        weights = self.lora_weights
        if (weights is not None and (lora is not None or lora_correction is not None)
                and self._overlaps(x)):
            return self._overlapped(x, weights, lora, lora_correction, None)
        return self.forward(x, lora, lora_correction), None

    def _overlaps(self, x: torch.Tensor) -> bool:
        """Whether a LoRA call on ``x`` runs its delta on the side stream (module docstring)."""
        return x.is_cuda and 0 < x.shape[0] <= self.lora_overlap_tokens

    def _overlapped(self, x: torch.Tensor, weights: LoRASlotWeights, lora: LoRABatch | None,
                    lora_correction: LoRABatch | None, lora_into: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x Wᵀ + b, δ)``, ``δ`` computed on the side stream (into ``lora_into`` when given,
        else a zeroed buffer) while the GEMM runs; the main stream has joined the side stream."""
        main = torch.cuda.current_stream(x.device)
        side = lora_side_stream(x.device, self.lora_stream_priority)
        delta = lora_into if lora_into is not None else torch.empty(
            x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if lora_into is None:
                delta.zero_()
            _add_lora(delta, x, weights, lora, lora_correction)
        y = base_linear(x, self.weight, self.bias)
        main.wait_stream(side)
        return y, delta

    def extra_repr(self) -> str:
        pairs = zip(self.slice_names, self.slice_widths, strict=True)
        slices = ", ".join(f"{n}={w}" for n, w in pairs)
        return f"in={self.in_features}, {slices}, bias={self.bias is not None}"


def _add_lora(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights, lora: LoRABatch | None,
              lora_correction: LoRABatch | None) -> None:
    """``y += LoRA(x; lora) − LoRA(x; lora_correction)`` (either may be absent)."""
    if lora is not None:
        lora_apply(y, x, weights, lora)
    if lora_correction is not None:
        lora_apply(y, x, weights, lora_correction, scale_multiplier=-1.0)
