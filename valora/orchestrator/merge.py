"""In-place merge / unmerge of one adapter into the base weights, all layers at once.

``WeightSwitcher`` folds the adapter held in one LoRA slot into every (layer, module) it targets:
``W[key] += s·B·A`` (product in fp32, one rounding to the weight dtype), and takes it out again.

Restore strategies (``docs/modes.md`` has the memory/drift trade-off):

- ``"pristine"`` (default): a pristine copy of every targetable module's rows is taken once, at
  construction. Unmerge copies it back, so the base weights come back **bit-exactly** after any
  number of switches. While nothing is merged the weights *are* the pristine copy bit for bit, so
  merge runs in place, ``W_m = round(W + s·B·A) = round(P + s·B·A)``: one ``addmm_`` per module,
  one read + one write (a copy-then-GEMM from the pristine copy would move twice the bytes).
  ``switch(m1 → m2)`` first copies back every module of ``m1``, then merges ``m2`` in place, so
  ``W_m`` never depends on history. Cost: ``pristine_bytes`` extra memory on ``pristine_device``
  (the weights' device by default; pinned host memory makes unmerge a host-to-device copy).
- ``"resync"``: the pristine copy lives in host memory only. Unmerge subtracts the same fp32 delta
  it added; every ``resync_every``-th unmerge copies the touched modules back from the host copy.
  Drift after ``k`` unmerges since the last re-sync is bounded elementwise by
  :func:`resync_drift_bound`.

Compute (``compute=``): ``"triton"`` runs one launch of ``valora.ops.merge_kernel`` per module
(fp32 accumulation, one rounding, ``W`` read and written once; default on CUDA with Triton). In
pristine mode on half-precision weights the launches read the slot's rank and scale on the
device (``lowrank_update_slot``, through ``slot_merge.SlotMerger``), and from the second merge of a (slot, rank block, module set)
on they replay from a CUDA graph captured for it (``graphs=False``: always eager) — a merge
then costs no host time per module. ``"fused"`` runs one in-place cuBLAS ``addmm_`` per module
in the weight dtype (measured 2.3× the copy floor on an H200 at 7B shapes, hence the kernel);
``"chunked"`` adds an explicit fp32 product in row chunks (reference semantics on any device;
default elsewhere — CPU low-precision GEMMs round twice).

Invariant: the weights are base weights exactly when ``merged_adapter is None`` (pristine mode),
or within the drift bound of them (resync mode). Merging while merged is an error; ``switch``
goes from one merged adapter to another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from valora.errors import ValoraError
from valora.logger import get_logger
from valora.ops.lora import LoRASlotWeights
from valora.ops.merge_kernel import (
    lowrank_update_reference,
    lowrank_update_triton,
    triton_available,
)
from valora.orchestrator.slot_merge import SlotMerger

ModuleKey = tuple[int, str]
RestoreStrategy = Literal["pristine", "resync"]
ComputeStrategy = Literal["auto", "triton", "fused", "chunked"]

_log = get_logger(__name__)


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass(frozen=True)
class SwitchReport:
    """What one merge / unmerge / switch touched: modules and weight bytes written."""

    num_modules: int
    weight_bytes: int


@dataclass(frozen=True)
class _Delta:
    """One module's factors: ``ΔW = scale · b @ a`` (``b``: ``[out, r]``, ``a``: ``[r, in]``)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def max_resync_every(dtype: torch.dtype) -> int:
    """Largest re-sync period for which :func:`resync_drift_bound` holds: ``floor(1 / (10u))``
    (bf16: 25, fp16: 204, fp32: ~1.7M)."""
    unit = _UNIT_ROUNDOFF.get(dtype)
    if unit is None:
        raise ValoraError(f"unsupported weight dtype {dtype}")
    return int(1.0 / (10.0 * unit))


def resync_drift_bound(base: torch.Tensor, delta: torch.Tensor, num_unmerges: int) -> torch.Tensor:
    """Elementwise bound on ``|W_k − W|`` after ``num_unmerges`` subtract-unmerges (resync mode).

    Each merge rounds ``W_k + ΔW`` and each unmerge rounds ``W_m − ΔW`` once to the weight dtype
    (error ``<= u·|value|``, ``u`` its unit roundoff), plus fp32 roundings ``<= 2^-24·|value|``; the
    fp32 delta is the same every cycle, so only rounding errors accumulate, at most linearly. While
    the drift stays below ``(|W| + |ΔW|) / 2`` (guaranteed for ``k <= max_resync_every``), one
    cycle adds at most ``u·(3|W| + 4|ΔW|) + O(u²)``, hence::

        |W_k − W| <= k · 5u · (|W| + |ΔW|)        for k <= 1 / (10u)

    ``delta`` is the largest ``|ΔW|`` merged in those cycles (elementwise).
    """
    if num_unmerges > max_resync_every(base.dtype):
        raise ValoraError(f"drift bound holds for at most {max_resync_every(base.dtype)} "
                          f"unmerges in {base.dtype}, got {num_unmerges}")
    unit = _UNIT_ROUNDOFF[base.dtype]
    magnitude = base.float().abs() + delta.float().abs()
    return num_unmerges * 5.0 * unit * magnitude


class WeightSwitcher:
    """Merge / unmerge the adapter in one LoRA slot into base weights, in place.

    ``base_weights[key]`` is a view of module ``key``'s rows of the fused base weight
    (``[out_slice, in]``); ``slot_map[key] = (slot_weights, slice_index)`` locates that module's
    factors in the fused LoRA slot storage. Keys absent from ``slot_map`` are never touched.
    Callers keep the merged slot's contents unchanged (pinned) until ``unmerge`` returns.
    """

    def __init__(
        self,
        base_weights: Mapping[ModuleKey, torch.Tensor],
        slot_map: Mapping[ModuleKey, tuple[LoRASlotWeights, int]],
        *,
        restore: RestoreStrategy = "pristine",
        pristine_device: torch.device | str | None = None,
        resync_every: int = 16,
        compute: ComputeStrategy = "auto",
        chunk_elements: int = 1 << 22,
        graphs: bool = True,
    ) -> None:
        if restore not in ("pristine", "resync"):
            raise ValoraError(f"restore must be 'pristine' or 'resync', got {restore!r}")
        if compute not in ("auto", "triton", "fused", "chunked"):
            raise ValoraError(
                f"compute must be 'auto', 'triton', 'fused' or 'chunked', got {compute!r}")
        if resync_every < 1:
            raise ValoraError(f"resync_every must be >= 1, got {resync_every}")
        missing = sorted(set(slot_map) - set(base_weights))
        if missing:
            raise ValoraError(f"slot_map keys without base weights: {missing[:5]}")
        self._weights = {key: base_weights[key] for key in slot_map}
        self._slots = dict(slot_map)
        for key, weight in self._weights.items():
            _check_module(key, weight, *self._slots[key])
            if restore == "resync" and resync_every > max_resync_every(weight.dtype):
                raise ValoraError(f"resync_every={resync_every} exceeds the drift-bound limit "
                                  f"{max_resync_every(weight.dtype)} for {weight.dtype} weights")
        self.restore: RestoreStrategy = restore
        self.resync_every = resync_every
        self._compute = compute
        self._chunk_elements = max(1, chunk_elements)
        self._pristine = {key: _copy_to(weight, pristine_device, restore)
                          for key, weight in self._weights.items()}
        self._merged: dict[ModuleKey, _Delta | None] = {}
        # Pristine restore, Triton, half-precision weights with factors of their dtype: merges
        # go through SlotMerger (device-read rank/scale, graph replays). Decided once here.
        slot_path = restore == "pristine" and bool(self._weights) and all(
            weight.dtype != torch.float32 and self._slots[key][0].lora_a.dtype == weight.dtype
            and self._uses_triton(weight) for key, weight in self._weights.items())
        self._slot_merger = SlotMerger(self._weights, self._slots, graphs) if slot_path else None
        self._dirty: set[ModuleKey] = set()
        self._unmerges_since_resync = 0
        self.merged_adapter: str | None = None
        self.merged_slot: int | None = None

    @property
    def pristine_bytes(self) -> int:
        """Bytes held by the pristine copy (on ``pristine_device``)."""
        return sum(t.numel() * t.element_size() for t in self._pristine.values())

    def pristine_bytes_on(self, device_type: str) -> int:
        """``pristine_bytes`` when the copy lives on a ``device_type`` device, else 0."""
        device = self.pristine_device
        return self.pristine_bytes if device is not None and device.type == device_type else 0

    @property
    def pristine_device(self) -> torch.device | None:
        return next(iter(self._pristine.values())).device if self._pristine else None

    @property
    def unmerges_since_resync(self) -> int:
        """Subtract-unmerges since the weights were last exact (always 0 in pristine mode)."""
        return self._unmerges_since_resync

    def affected_bytes(self, slot: int) -> int:
        """Bytes of base weights the adapter in ``slot`` targets (a switch reads + writes them)."""
        return sum(self._weights[key].numel() * self._weights[key].element_size()
                   for key in self._deltas(slot))

    def pristine(self, key: ModuleKey) -> torch.Tensor:
        """The pristine copy of module ``key`` (read-only by contract)."""
        return self._pristine[key]

    def merge(self, slot: int, adapter_name: str) -> SwitchReport:
        """Fold the adapter in ``slot`` into the weights: ``W[key] = round(W[key] + s·B·A)``."""
        if self.merged_adapter is not None:
            raise ValoraError(f"adapter {self.merged_adapter!r} is merged; unmerge or switch first")
        if self._slot_merger is not None:
            keys = self._slot_merger.targeted(slot)
            if not keys:
                raise ValoraError(f"slot {slot} ({adapter_name!r}) targets no module: "
                                  "nothing to merge")
            self._slot_merger.merge(slot, keys)
            merged: dict[ModuleKey, _Delta | None] = dict.fromkeys(keys)
        else:
            deltas = self._deltas(slot)
            if not deltas:
                raise ValoraError(f"slot {slot} ({adapter_name!r}) targets no module: "
                                  "nothing to merge")
            if self.restore == "resync":
                # Subtract-unmerge must remove exactly what was added, even if the slot is
                # rewritten.
                deltas = {k: _Delta(d.a.clone(), d.b.clone(), d.scale) for k, d in deltas.items()}
            # Pristine mode: nothing merged => weights == pristine bit for bit: in place is exact.
            for key, delta in deltas.items():
                self._add_delta(self._weights[key], delta, 1.0)
            merged = dict(deltas)
        self._merged = merged
        self._dirty.update(merged)
        self.merged_adapter, self.merged_slot = adapter_name, slot
        _log.debug("merged %s (slot %d) into %d modules", adapter_name, slot, len(merged))
        return self._report(merged)

    def warm_up(self) -> int:
        """Compile the merge kernels before the first switch needs them (a compile inside a
        switch stalls every request; the first H200 serving run's 19 switches took 1.25 s, the
        next run's 15 took 0.27 s); weights are not touched. Returns the launches made (0 off
        the slot path: other compute strategies compile nothing)."""
        return self._slot_merger.warm_up() if self._slot_merger is not None else 0

    def _uses_triton(self, dst: torch.Tensor) -> bool:
        return self._compute == "triton" or (self._compute == "auto" and dst.is_cuda
                                             and triton_available())

    def unmerge(self) -> SwitchReport:
        """Take the merged adapter out again (exact copy-back, or subtract + periodic re-sync)."""
        if self.merged_adapter is None:
            raise ValoraError("no adapter is merged")
        deltas = self._merged
        if self.restore == "pristine":
            self._copy_back(deltas)
        else:
            self._unmerges_since_resync += 1
            if self._unmerges_since_resync >= self.resync_every:
                self._copy_back(self._dirty)
                self._dirty.clear()
                self._unmerges_since_resync = 0
            else:
                for key, delta in deltas.items():
                    assert delta is not None  # resync merges keep their factors
                    self._add_delta(self._weights[key], delta, -1.0)
        self._merged = {}
        self.merged_adapter = self.merged_slot = None
        return self._report(deltas)

    def switch(self, slot: int, adapter_name: str) -> SwitchReport:
        """Go to ``adapter_name`` merged from whatever is merged now (no-op if it already is)."""
        if self.merged_adapter == adapter_name and self.merged_slot == slot:
            return SwitchReport(0, 0)
        if self.merged_adapter is None:
            return self.merge(slot, adapter_name)
        first = self.unmerge()
        second = self.merge(slot, adapter_name)
        return SwitchReport(first.num_modules + second.num_modules,
                            first.weight_bytes + second.weight_bytes)

    def _deltas(self, slot: int) -> dict[ModuleKey, _Delta]:
        """Factors of every module the adapter in ``slot`` targets (rank > 0).

        Scales are read to the host in one transfer (one device sync for all layers)."""
        targeted: list[tuple[ModuleKey, LoRASlotWeights, int, int]] = []
        for key, (weights, j) in self._slots.items():
            if not 0 <= slot < weights.num_slots:
                raise ValoraError(f"slot {slot} out of range [0, {weights.num_slots}) for {key}")
            ranks = weights.host_ranks()
            if int(ranks[slot][j]) > 0:
                targeted.append((key, weights, j, int(ranks[slot][j])))
        if not targeted:
            return {}
        scales = torch.stack([w.scales[slot, j] for _, w, j, _ in targeted]).tolist()
        deltas: dict[ModuleKey, _Delta] = {}
        for (key, weights, j, rank), scale in zip(targeted, scales, strict=True):
            offset = sum(weights.slice_widths[:j])
            width = weights.slice_widths[j]
            deltas[key] = _Delta(a=weights.lora_a[slot, j, :rank],
                                 b=weights.lora_b[slot, offset:offset + width, :rank],
                                 scale=float(scale))
        return deltas

    def _copy_back(self, keys: Iterable[ModuleKey]) -> None:
        for key in keys:
            self._weights[key].copy_(self._pristine[key], non_blocking=True)

    def _report(self, keys: Iterable[ModuleKey]) -> SwitchReport:
        sizes = [self._weights[k].numel() * self._weights[k].element_size() for k in keys]
        return SwitchReport(len(sizes), sum(sizes))

    def _add_delta(self, dst: torch.Tensor, delta: _Delta, sign: float) -> None:
        """``dst = round(dst + sign·scale·b@a)`` in place, product and sum in fp32, one rounding.

        Fused: one ``addmm_`` in the weight dtype (cuBLAS accumulates bf16/fp16 GEMMs in fp32 and
        applies ``beta·C`` in fp32), reading and writing ``dst`` once. Chunked: explicit fp32 row
        chunks (the reference semantics)."""
        alpha = sign * delta.scale
        if self._uses_triton(dst):
            # B is a rank-prefix view of the slot (row stride = the slots' storage rank): a
            # contiguous copy is a few hundred KB and gives the kernel dense rows.
            lowrank_update_triton(dst, delta.b.contiguous(), delta.a.contiguous(), alpha)
            return
        fused = self._compute == "fused" or (self._compute == "auto" and dst.is_cuda)
        if dst.dtype == torch.float32 or fused:
            dst.addmm_(delta.b.to(dst.dtype), delta.a.to(dst.dtype), alpha=alpha)
            return
        lowrank_update_reference(dst, delta.b, delta.a, alpha, self._chunk_elements)


def _check_module(key: ModuleKey, weight: torch.Tensor, slots: LoRASlotWeights, j: int) -> None:
    if not 0 <= j < len(slots.slice_widths):
        raise ValoraError(f"{key}: slice index {j} out of range for widths {slots.slice_widths}")
    expected = (slots.slice_widths[j], int(slots.lora_a.shape[3]))
    if tuple(weight.shape) != expected:
        raise ValoraError(f"{key}: base weight {tuple(weight.shape)}, LoRA slice needs {expected}")
    if weight.dtype not in _UNIT_ROUNDOFF:
        raise ValoraError(f"{key}: unsupported weight dtype {weight.dtype}")


def _copy_to(weight: torch.Tensor, device: torch.device | str | None,
             restore: RestoreStrategy) -> torch.Tensor:
    """A detached copy on ``device`` (default: weights' device, or host for resync), pinned when
    it is host memory backing CUDA weights."""
    target = torch.device(device) if device is not None else (
        weight.device if restore == "pristine" else torch.device("cpu"))
    pin = target.type == "cpu" and weight.is_cuda
    copy = torch.empty(weight.shape, dtype=weight.dtype, device=target, pin_memory=pin)
    copy.copy_(weight.detach())
    return copy
