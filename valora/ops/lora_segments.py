"""Per-step token segments for the Triton LoRA kernels, built on the device without host sync.

Given ``token_slots [T]`` (slot per token, -1 = none), ``LoRASegments.update`` computes::

    key[t]          = token_slots[t] if 0 <= token_slots[t] < S else S      # S = "no adapter"
    sorted_tokens   = argsort(key, stable)          # tokens grouped by slot, rows without last
    count[s]        = #{t : key[t] == s},  start[s] = Σ_{s' < s} count[s']
    for each block_m in BLOCK_M_CHOICES, tile i of the list covers
        sorted_tokens[tile_start[i] : tile_start[i] + tile_rows[i]]  (one slot: tile_slot[i]),
        tiles of slot s are ceil(count[s] / block_m) consecutive entries; unused entries have
        tile_slot = -1 and their programs exit at once.

The tile list of ``block_m`` has the static length ``tile_bound(block_m) = ceil(T / block_m) +
min(S, T)`` ≥ Σ_s ceil(count[s] / block_m), so kernel grids depend on (T, S) only. Every buffer
is allocated once by ``allocate`` and rewritten in place by ``update``: a CUDA graph captured
around the kernels stays valid when the next step's slots are written with ``update``.
Slots outside ``[-1, S)`` trip a device-side assert on CUDA (and a ``ValoraError`` on the CPU);
their tokens are never read with an out-of-range slot.

With a correction (segments allocated ``with_correction``; ``update(..., correction_slots=c)``,
the mixed mode of ``valora.ops.lora``): tokens without an adapter of their own but with
``c[t] >= 0`` form one more group, ``S``, sorted after the slots' groups, whose tiles carry the
slot value ``-2`` (no adapter of their own, correction only); tokens with neither stay last
without tiles. ``correction[0]`` holds the merged slot ``m = max(c)`` (-1: nothing to correct),
written on the device. The tile bound counts ``S + 1`` groups then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from valora.errors import ValoraError
from valora.ops.lora import LoRABatch
from valora.ops.tile_config import BLOCK_M_CHOICES

assert tuple(BLOCK_M_CHOICES[0] << i for i in range(len(BLOCK_M_CHOICES))) == BLOCK_M_CHOICES


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class LoRASegments:
    """Static device buffers describing how one step's tokens group by slot.

    ``tiles``: ``[len(BLOCK_M_CHOICES), 3, tile_capacity]`` int32 — rows slot / start / rows.
    ``num_active_slots`` / ``active_slots``: host hints for the current slots, set by each
    ``update`` (-1 / None = unknown, as for CUDA-graph replays, whose slots change on the device
    only); ``active_slots``, when known, holds every slot of the tokens (sorted).
    """

    num_tokens: int
    num_slots: int
    num_active_slots: int
    sorted_tokens: torch.Tensor
    tiles: torch.Tensor
    _block_sizes: torch.Tensor
    _tile_index: torch.Tensor
    active_slots: tuple[int, ...] | None = None
    correction: torch.Tensor | None = None
    """``[1]`` int32 on the device: the merged slot to subtract (-1: none); None for segments
    allocated without correction (module docstring)."""
    correction_slot: int | None = None
    """``correction[0]`` when the host knows it (a tiling hint), else None."""
    read_slots: tuple[int, ...] | None = None
    """Every slot whose weights the step reads (the tokens' own, plus the merged slot of a
    correction), sorted, when the host knows them; set by ``update``."""
    launch_plans: dict[Any, Any] = field(default_factory=dict)
    _tile_views: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    """Host-side launch choices of the current slots, per layer shape (``triton_lora``); a
    cache, emptied by every ``update``."""

    @classmethod
    def allocate(cls, num_tokens: int, num_slots: int, device: torch.device | str,
                 num_active_slots: int = -1,
                 active_slots: tuple[int, ...] | None = None,
                 with_correction: bool = False) -> LoRASegments:
        if num_slots < 1:
            raise ValoraError(f"LoRA segments need at least one slot, got {num_slots}")
        if num_tokens < 0:
            raise ValoraError(f"num_tokens must be >= 0, got {num_tokens}")
        groups = num_slots + int(with_correction)
        capacity = _cdiv(cls.tile_bound_for(num_tokens, groups, BLOCK_M_CHOICES[0]), 4) * 4
        # 16 << i on the device itself: no host-to-device copy (BLOCK_M_CHOICES are 16·2^i).
        count = len(BLOCK_M_CHOICES)
        blocks = torch.full((count, 1), BLOCK_M_CHOICES[0], dtype=torch.int64, device=device)
        blocks = blocks << torch.arange(count, dtype=torch.int64, device=device).view(-1, 1)
        return cls(
            num_tokens=num_tokens,
            num_slots=num_slots,
            num_active_slots=num_active_slots,
            sorted_tokens=torch.zeros(num_tokens, dtype=torch.int32, device=device),
            tiles=torch.full((len(BLOCK_M_CHOICES), 3, capacity), -1, dtype=torch.int32,
                             device=device),
            _block_sizes=blocks,
            _tile_index=torch.arange(capacity, dtype=torch.int64, device=device)
            .expand(len(BLOCK_M_CHOICES), capacity).contiguous(),
            active_slots=active_slots,
            read_slots=active_slots,
            correction=(torch.full((1,), -1, dtype=torch.int32, device=device)
                        if with_correction else None),
        )

    @staticmethod
    def tile_bound_for(num_tokens: int, num_slots: int, block_m: int) -> int:
        return _cdiv(num_tokens, block_m) + min(num_slots, num_tokens)

    def _checked(self, slots: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``slots`` as int64 on the segments' device and its in-range mask; out-of-range slots
        trip a device-side assert on CUDA, a ``ValoraError`` on the CPU (module docstring)."""
        values = slots.to(device=self.tiles.device, dtype=torch.int64)
        in_range = (values >= -1) & (values < self.num_slots)
        if values.device.type == "cuda":
            torch._assert_async(in_range.all())
        elif not bool(in_range.all()):
            raise ValoraError(f"{name} out of range [-1, {self.num_slots})")
        return values, in_range

    @property
    def num_groups(self) -> int:
        """Token groups with tiles: one per slot, plus the correction-only group."""
        return self.num_slots + int(self.correction is not None)

    def tile_bound(self, block_m: int) -> int:
        return self.tile_bound_for(self.num_tokens, self.num_groups, block_m)

    def tile_list(self, block_m: int) -> torch.Tensor:
        """The ``[3, tile_capacity]`` view for ``block_m`` (a row stride of ``tile_capacity``);
        one view object per ``block_m`` for the segments' life (every layer asks)."""
        views = self._tile_views
        if not views:
            views.update((m, self.tiles[i]) for i, m in enumerate(BLOCK_M_CHOICES))
        return views[block_m]

    @property
    def tile_capacity(self) -> int:
        return int(self.tiles.shape[2])

    def update(self, token_slots: torch.Tensor, num_active_slots: int = -1,
               active_slots: tuple[int, ...] | None = None,
               correction_slots: torch.Tensor | None = None,
               correction_slot: int | None = None) -> None:
        """Rewrite every buffer in place for ``token_slots`` (and ``correction_slots``, for
        segments allocated with correction; left out: nothing to correct). No host
        synchronisation on CUDA. The host hints are replaced too: left out, they read as
        unknown."""
        if token_slots.shape != (self.num_tokens,):
            raise ValoraError(
                f"token_slots shape {tuple(token_slots.shape)} != ({self.num_tokens},)")
        if correction_slots is not None and self.correction is None:
            raise ValoraError("correction_slots given to segments allocated without correction")
        if correction_slots is not None and correction_slots.shape != (self.num_tokens,):
            raise ValoraError(f"correction_slots shape {tuple(correction_slots.shape)} != "
                              f"({self.num_tokens},)")
        self.num_active_slots = num_active_slots
        self.active_slots = active_slots
        self.correction_slot = correction_slot if correction_slots is not None else None
        self.read_slots = active_slots
        if active_slots is not None and correction_slots is not None:
            self.read_slots = (None if correction_slot is None
                               else tuple(sorted({*active_slots, correction_slot})))
        self.launch_plans.clear()
        if self.correction is not None:
            self.correction.fill_(-1)
        if self.num_tokens == 0:
            return
        num_slots, groups = self.num_slots, self.num_groups
        slots, in_range = self._checked(token_slots, "token_slots")
        key = torch.where(in_range & (slots >= 0), slots, groups)
        if correction_slots is not None:
            assert self.correction is not None
            corrected, _ = self._checked(correction_slots, "correction_slots")
            key = torch.where((key == groups) & (corrected >= 0), num_slots, key)
            self.correction.copy_(corrected.max().clamp(min=-1).view(1))
        order = torch.sort(key, stable=True).indices
        self.sorted_tokens.copy_(order)
        counts = torch.zeros(groups + 1, dtype=torch.int64, device=slots.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        counts = counts[:groups]
        starts = torch.cumsum(counts, 0) - counts
        blocks = self._block_sizes                                   # [B, 1]
        tiles_per_slot = (counts.unsqueeze(0) + blocks - 1) // blocks  # [B, S]
        tiles_end = torch.cumsum(tiles_per_slot, 1)                   # [B, S] inclusive
        index = self._tile_index                                      # [B, C]
        slot = torch.searchsorted(tiles_end, index, right=True)       # [B, C] in [0, G]
        used = slot < groups
        slot_c = slot.clamp(max=groups - 1)
        first = torch.gather(tiles_end, 1, slot_c) - torch.gather(tiles_per_slot, 1, slot_c)
        offset = (index - first) * blocks
        start = starts[slot_c] + offset
        rows = torch.minimum(counts[slot_c] - offset, blocks)
        label = torch.where(slot_c == num_slots, -2, slot_c)  # the correction-only group
        self.tiles[:, 0].copy_(torch.where(used, label, -1))
        self.tiles[:, 1].copy_(torch.where(used, start, 0))
        self.tiles[:, 2].copy_(torch.where(used, rows, 0))


def unhinted_lora_batch(token_slots: torch.Tensor, num_slots: int,
                        correction_slots: torch.Tensor | None = None) -> LoRABatch:
    """A ``"triton"`` LoRA batch over ``token_slots`` (and ``correction_slots``) whose segments
    are built on the device with no host hints — the batches CUDA graphs capture: their tiles
    must serve every batch a replay may carry (``triton_lora.choose_tile_config``: the bucket's
    mix entry, else the worst case). ``backend_data`` is the ``LoRASegments``; ``update`` it from
    the same buffers to reuse it."""
    segments = LoRASegments.allocate(int(token_slots.shape[0]), num_slots, token_slots.device,
                                     with_correction=correction_slots is not None)
    segments.update(token_slots, correction_slots=correction_slots)
    return LoRABatch(token_slots=token_slots, num_slots=num_slots, backend="triton",
                     backend_data=segments, correction_slots=correction_slots)
