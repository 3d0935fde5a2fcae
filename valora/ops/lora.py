"""The batched multi-adapter LoRA op: one interface, several backends.

Weights of all resident adapters for one (possibly fused) linear live in *slots*:

- ``lora_a``: ``[num_slots, num_slices, max_rank, in_features]``
- ``lora_b``: ``[num_slots, sum(slice_widths), max_rank]`` — stored either *rank-major*, as the
  transposed view of a contiguous ``[num_slots, max_rank, sum(slice_widths)]`` tensor (each rank's
  output columns side by side; ``LoRASlotWeights.b_rank_major``; the default), or contiguous
  (each output column's ranks side by side). Code that indexes ``lora_b[s, cols, :r]`` sees the
  same values either way; the Triton expand reads each layout as it lies (``VALORA_LORA_B_LAYOUT``,
  ``lora_b_layout``)
- ``ranks``:  ``[num_slots, num_slices]`` int32 — the true rank of each slot's slice
  (0 = the adapter does not target that slice)
- ``scales``: ``[num_slots, num_slices]`` float32 — ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA)

Semantics (``y`` is updated in place)::

    for t in range(T):
        s = token_slots[t]
        if s < 0: continue                       # row without adapter
        for j, w in enumerate(slice_widths):
            r, off = ranks[s, j], sum(slice_widths[:j])
            y[t, off:off+w] += scale_multiplier * scales[s, j] * (
                (x[t] @ lora_a[s, j, :r].T) @ lora_b[s, off:off+w, :r].T)

Storage is padded to ``max_rank`` per slot, but no backend computes on the padding: work is
proportional to each token's own adapter rank. **The padding must hold finite values**
(``LoRASlotWeights.allocate`` zero-fills it and the engine's slot writer zeroes a slot before
writing an adapter): the Triton expand loads ``B``'s padding up to the next multiple of its rank
block in a rank-tail chunk (16-byte loads instead of 2-byte ones) and multiplies it by zeros —
which a NaN or an infinity there would turn into NaN.

Mixed mode in one op (``prepare_lora_batch(..., correction_slots=c)``): then also ::

    for t in range(T):
        if c[t] >= 0:                            # undo the merged adapter's delta
            y[t] -= scale_multiplier * LoRA_{c[t]}(x[t])    # (same sum as above, slot c[t])

with one merged slot ``m`` (every ``c[t]`` is -1 or ``m``) and every token that has an adapter of
its own corrected (``token_slots[t] >= 0 ⇒ c[t] = m`` once any ``c[t]`` is ``m``) — the batches
``valora.orchestrator.modes.plan_lora_batches`` makes. The Triton backend computes both terms in
one shrink and one expand launch (``triton_lora``), instead of a second ``lora_apply`` with
``scale_multiplier=-1``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from valora.errors import ValoraError

B_LAYOUTS = ("column", "rank")
"""Storage layouts of ``lora_b`` (module docstring): ``"column"`` contiguous ``[S, out, R]``,
``"rank"`` the transposed view of a contiguous ``[S, R, out]``."""


def lora_b_layout() -> str:
    """The ``lora_b`` layout new slot storage gets: ``VALORA_LORA_B_LAYOUT`` (``"rank"`` when
    unset). Rank-major ``B`` lets the decode expand read each rank's output columns
    contiguously and mask the rank tail exactly; with mix entries re-tuned for it, a 7B decode
    step on an H200 (CUDA graphs, batch 32) took 10.26 → 9.82 ms with 32 adapters of ranks 8–64,
    8.30 → 8.09 with 8, 7.80 → 7.81 with one, the base unchanged
    (``bench/results/model/h200-rank-major-758315d/``). ``"column"`` is the layout of before."""
    return _checked_layout(os.environ.get("VALORA_LORA_B_LAYOUT", "rank"),
                           "VALORA_LORA_B_LAYOUT=")


def _checked_layout(layout: str, what: str = "lora_b layout ") -> str:
    if layout not in B_LAYOUTS:
        raise ValoraError(f"{what}{layout!r}: choose one of {B_LAYOUTS}")
    return layout


def b_storage(lora_b: torch.Tensor, layout: str) -> torch.Tensor:
    """``lora_b`` (any strides) with the same values stored in ``layout`` (a copy unless it is
    already so)."""
    if _checked_layout(layout) == "column":
        return lora_b.contiguous()
    return lora_b.transpose(1, 2).contiguous().transpose(1, 2)


@dataclass
class LoRASlotWeights:
    """Resident adapter weights for one linear layer (see module docstring for layouts)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    slice_widths: tuple[int, ...]
    ranks_cpu: list[list[int]] = field(default_factory=list)

    @property
    def num_slots(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.lora_a.shape[2])

    @property
    def b_rank_major(self) -> bool:
        """Whether ``lora_b`` is stored rank-major (module docstring) rather than contiguous."""
        b = self.lora_b
        return not b.is_contiguous() and b.transpose(1, 2).is_contiguous()

    def host_ranks(self) -> list[list[int]]:
        """``ranks[slot][slice]`` on the host: the mirror when kept, else one device read."""
        return self.ranks_cpu or self.ranks.tolist()

    def active_slice_ranks(self, slots: tuple[int, ...]) -> tuple[int, ...] | None:
        """Per slice ``j``: ``max(min(ranks[s][j], max_rank) for s in slots)`` (0 for no slots),
        from the host mirror ``ranks_cpu`` only; None when no complete mirror is kept.

        Never reads ``ranks`` (no device synchronisation). O(len(slots) × num_slices), in C-level
        builtins. ``slots`` must lie in ``[0, num_slots)``.
        """
        mirror = self.ranks_cpu
        if len(mirror) != self.num_slots:
            return None
        num_slices, storage = len(self.slice_widths), self.max_rank
        if not slots:
            return (0,) * num_slices
        columns = zip(*map(mirror.__getitem__, slots), strict=True)
        ranks = tuple(max(min(max(column), storage), 0) for column in columns)
        return ranks if len(ranks) == num_slices else None

    @classmethod
    def empty(
        cls,
        num_slots: int,
        max_rank: int,
        in_features: int,
        slice_widths: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        b_layout: str | None = None,
    ) -> LoRASlotWeights:
        """Allocate zeroed slot storage (every slot empty: rank 0); ``lora_b`` in ``b_layout``
        (default ``lora_b_layout()``)."""
        layout = lora_b_layout() if b_layout is None else _checked_layout(b_layout)
        out = sum(slice_widths)
        if layout == "rank":
            lora_b = torch.zeros(num_slots, max_rank, out, dtype=dtype, device=device)
            lora_b = lora_b.transpose(1, 2)
        else:
            lora_b = torch.zeros(num_slots, out, max_rank, dtype=dtype, device=device)
        return cls(
            lora_a=torch.zeros(num_slots, len(slice_widths), max_rank, in_features, dtype=dtype,
                               device=device),
            lora_b=lora_b,
            ranks=torch.zeros(num_slots, len(slice_widths), dtype=torch.int32, device=device),
            scales=torch.zeros(num_slots, len(slice_widths), dtype=torch.float32, device=device),
            slice_widths=tuple(slice_widths),
            ranks_cpu=[[0] * len(slice_widths) for _ in range(num_slots)],
        )


@dataclass
class LoRABatch:
    """Per-step LoRA metadata, prepared once per forward pass and shared by every layer.

    ``token_slots``: ``[T]`` int32 slot per token (-1 = none). ``backend_data`` holds whatever the
    chosen backend precomputes from it (sorted token order, segments); layers never read it.
    ``active_slots`` (sorted, distinct, in ``[0, num_slots)``) covers every slot of
    ``token_slots`` when the host knows them, None otherwise (e.g. CUDA-graph batches); the
    Triton backend keys its tile choice by the largest rank among them (``triton_lora``).
    """

    token_slots: torch.Tensor
    num_slots: int
    backend: str
    backend_data: object = None
    token_slots_cpu: list[int] = field(default_factory=list)
    num_active_slots: int = -1
    """Distinct slots among the tokens when the host knows it (-1 = unknown); a tiling hint only."""
    active_slots: tuple[int, ...] | None = None
    """Every slot among the tokens, sorted (None = unknown). Computed once per batch."""
    correction_slots: torch.Tensor | None = None
    """``[T]`` int32: the merged slot for tokens to correct, else -1 (module docstring); None
    for a batch without correction."""
    correction_slot: int | None = None
    """The merged slot ``m`` when the host knows it (a tiling hint, like ``active_slots``)."""


LoRAApplyFn = Callable[[torch.Tensor, torch.Tensor, LoRASlotWeights, LoRABatch, float], None]
LoRAPrepareFn = Callable[[LoRABatch], object]

_BACKENDS: dict[str, tuple[LoRAPrepareFn, LoRAApplyFn]] = {}


def register_lora_backend(name: str, prepare: LoRAPrepareFn, apply: LoRAApplyFn) -> None:
    """Register a backend: ``prepare`` builds ``backend_data``; ``apply`` computes the op."""
    _BACKENDS[name] = (prepare, apply)


def available_lora_backends() -> list[str]:
    _ensure_builtin_backends()
    return sorted(_BACKENDS)


def _ensure_builtin_backends() -> None:
    if "reference" not in _BACKENDS:
        from valora.ops import reference

        register_lora_backend("reference", reference.prepare_lora_reference,
                              reference.lora_apply_reference)
    if "triton" not in _BACKENDS and importlib.util.find_spec("triton") is not None:
        # Registered without importing triton: the kernels are imported on the first call.
        register_lora_backend("triton", _prepare_triton, _apply_triton)


def _prepare_triton(batch: LoRABatch) -> object:
    from valora.ops.triton_lora import prepare_lora_triton

    return prepare_lora_triton(batch)


def _apply_triton(y: torch.Tensor, x: torch.Tensor, weights: LoRASlotWeights, batch: LoRABatch,
                  scale_multiplier: float) -> None:
    """First call: import the kernels and register the launcher itself (later calls skip this
    indirection; the op runs once per layer and step)."""
    from valora.ops.triton_lora import lora_apply_triton

    _BACKENDS["triton"] = (_prepare_triton, lora_apply_triton)
    lora_apply_triton(y, x, weights, batch, scale_multiplier)


def resolve_lora_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA when Triton is installed, else ``"reference"``."""
    _ensure_builtin_backends()
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and "triton" in _BACKENDS else "reference"


def prepare_lora_batch(token_slots: torch.Tensor, num_slots: int, backend: str = "reference",
                       num_active_slots: int | None = None, defer: bool = False,
                       active_slots: Iterable[int] | None = None,
                       correction_slots: torch.Tensor | None = None,
                       correction_slot: int | None = None) -> LoRABatch:
    """Validate ``token_slots`` and build the step's LoRA metadata for ``backend``.

    ``defer=True`` leaves ``backend_data`` unset: the first ``lora_apply`` of the step builds it
    (still once per step, since every layer shares the batch). The engine defers because a decode
    step replayed from a CUDA graph reads only ``token_slots`` and never needs it.

    ``backend`` may be ``"auto"`` (see ``resolve_lora_backend``). ``num_active_slots`` (distinct
    slots among the tokens, when the caller knows it) only steers the Triton tile choice; it is
    derived here when ``token_slots`` lives on the CPU. Nothing here synchronises with a GPU.

    ``active_slots``: the slots ``token_slots`` uses, for a caller that knows them on the host
    while ``token_slots`` lives on the device (a superset is allowed: it only weakens the tile
    hint; a set missing a used slot is a caller bug: the Triton backend may then skip or trim
    work that slot needed). Derived (exactly) when ``token_slots`` lives on the CPU; when given
    as well it must cover the derived set. It defaults ``num_active_slots`` to its size.

    ``correction_slots`` (``[T]``, same device): the mixed-mode correction in the same op (module
    docstring); on the CPU its invariants are checked and ``correction_slot`` derived, on a
    device the caller passes ``correction_slot`` (the merged slot, or None when unknown, e.g.
    for CUDA-graph batches) and the kernels assume the invariants.
    """
    backend = resolve_lora_backend(backend, token_slots.device)
    if backend not in _BACKENDS:
        raise ValoraError(
            f"unknown LoRA backend {backend!r}; available: {available_lora_backends()}")
    if token_slots.dim() != 1:
        raise ValoraError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
    slots_cpu = token_slots.tolist() if token_slots.device.type == "cpu" else []
    if slots_cpu and (max(slots_cpu) >= num_slots or min(slots_cpu) < -1):
        raise ValoraError(f"token_slots out of range [-1, {num_slots}): "
                          f"min {min(slots_cpu)}, max {max(slots_cpu)}")
    active = _active_slot_set(slots_cpu, num_slots, active_slots)
    if num_active_slots is None:
        num_active_slots = len(active) if active is not None else -1
    if correction_slots is not None:
        if correction_slots.device != token_slots.device:
            raise ValoraError(f"correction_slots on {correction_slots.device}, token_slots on "
                              f"{token_slots.device}")
        if correction_slots.shape != token_slots.shape:
            raise ValoraError(f"correction_slots shape {tuple(correction_slots.shape)} != "
                              f"token_slots shape {tuple(token_slots.shape)}")
        correction_slot = _check_correction(slots_cpu, correction_slots, num_slots,
                                            correction_slot)
        correction_slots = correction_slots.to(torch.int32)
    batch = LoRABatch(token_slots=token_slots.to(torch.int32), num_slots=num_slots, backend=backend,
                      token_slots_cpu=slots_cpu, num_active_slots=num_active_slots,
                      active_slots=active, correction_slots=correction_slots,
                      correction_slot=correction_slot)
    if not defer:
        batch.backend_data = _BACKENDS[backend][0](batch)
    return batch


def _check_correction(slots_cpu: list[int], correction: torch.Tensor, num_slots: int,
                      given: int | None) -> int | None:
    """The merged slot of a correction (module docstring), checked where the host can see the
    slots (CPU tensors); ``given`` (or None) for device tensors, checked for range only."""
    if given is not None and not 0 <= given < num_slots:
        raise ValoraError(f"correction_slot {given} out of range [0, {num_slots})")
    if correction.device.type != "cpu":
        return given
    merged = sorted({c for c in correction.tolist() if c != -1})
    if len(merged) > 1 or (merged and not 0 <= merged[0] < num_slots):
        raise ValoraError(f"correction_slots must be -1 or one merged slot in [0, {num_slots}), "
                          f"got {merged}")
    if not merged:
        return given
    if given is not None and given != merged[0]:
        raise ValoraError(f"correction_slot {given} disagrees with correction_slots ({merged[0]})")
    uncorrected = [t for t, (s, c) in enumerate(zip(slots_cpu, correction.tolist(), strict=True))
                   if s >= 0 and c < 0]
    if uncorrected:
        raise ValoraError(f"tokens {uncorrected[:8]} have an adapter of their own but no "
                          "correction while another adapter is merged")
    return merged[0]


def _active_slot_set(slots_cpu: list[int], num_slots: int,
                     given: Iterable[int] | None) -> tuple[int, ...] | None:
    """The batch's sorted active slots: derived from host slots, else ``given``, else None."""
    derived = sorted({s for s in slots_cpu if s >= 0}) if slots_cpu else None
    if given is None:
        return tuple(derived) if derived is not None else None
    claimed = sorted({int(s) for s in given})
    if claimed and (claimed[0] < 0 or claimed[-1] >= num_slots):
        raise ValoraError(f"active_slots out of range [0, {num_slots}): {claimed}")
    if derived is not None:
        missing = set(derived).difference(claimed)
        if missing:
            raise ValoraError(f"active_slots {claimed} miss slots used by the tokens: "
                              f"{sorted(missing)}")
        return tuple(derived)
    return tuple(claimed)


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: LoRASlotWeights,
    batch: LoRABatch,
    scale_multiplier: float = 1.0,
) -> None:
    """``y += LoRA(x)`` for every token's adapter (see module docstring). In place."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValoraError(
            f"lora_apply: x {tuple(x.shape)} and y {tuple(y.shape)} must be [T, *] alike")
    if x.shape[0] != batch.token_slots.shape[0]:
        raise ValoraError(
            f"lora_apply: {x.shape[0]} tokens but {batch.token_slots.shape[0]} token slots")
    if y.shape[1] != sum(weights.slice_widths) or x.shape[1] != weights.lora_a.shape[3]:
        raise ValoraError(
            f"lora_apply: widths disagree: x {x.shape[1]} vs A {weights.lora_a.shape[3]}, "
            f"y {y.shape[1]} vs slices {weights.slice_widths}")
    if x.shape[0] == 0:
        return
    if batch.backend not in _BACKENDS:
        _ensure_builtin_backends()
        if batch.backend not in _BACKENDS:
            raise ValoraError(f"unknown LoRA backend {batch.backend!r}; "
                              f"available: {available_lora_backends()}")
    prepare, apply = _BACKENDS[batch.backend]
    if batch.backend_data is None:  # deferred (see prepare_lora_batch)
        batch.backend_data = prepare(batch)
    apply(y, x, weights, batch, scale_multiplier)
