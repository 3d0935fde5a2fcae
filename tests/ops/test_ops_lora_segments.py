"""Properties of the device-side token segments (the Triton backend's prepare step)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from valora.ops.lora_segments import LoRASegments
from valora.ops.tile_config import BLOCK_M_CHOICES


@settings(max_examples=60, deadline=None)
@given(num_slots=st.integers(1, 9), data=st.data())
def test_tiles_cover_every_adapter_token_once(num_slots: int, data: st.DataObject) -> None:
    slots = data.draw(st.lists(st.integers(-1, num_slots - 1), min_size=0, max_size=70))
    token_slots = torch.tensor(slots, dtype=torch.int32)
    segments = LoRASegments.allocate(len(slots), num_slots, "cpu")
    segments.update(token_slots)
    order = segments.sorted_tokens.tolist()
    assert sorted(order) == list(range(len(slots)))
    keys = [slots[t] if slots[t] >= 0 else num_slots for t in order]
    assert keys == sorted(keys), "tokens must be grouped by slot, rows without adapter last"
    for block_m in BLOCK_M_CHOICES:
        tile_slot, tile_start, tile_rows = segments.tile_list(block_m).tolist()
        bound = segments.tile_bound(block_m)
        assert all(s == -1 for s in tile_slot[bound:]), "tiles beyond the static bound"
        covered: list[int] = []
        for slot, start, rows in zip(tile_slot, tile_start, tile_rows, strict=True):
            if slot < 0:
                continue
            assert 1 <= rows <= block_m
            members = order[start:start + rows]
            assert all(slots[t] == slot for t in members)
            covered.extend(members)
        assert sorted(covered) == sorted(t for t, s in enumerate(slots) if s >= 0)


def test_update_rewrites_the_same_buffers() -> None:
    segments = LoRASegments.allocate(5, 3, "cpu")
    buffers = (segments.sorted_tokens.data_ptr(), segments.tiles.data_ptr())
    segments.update(torch.tensor([2, 2, 0, -1, 1], dtype=torch.int32))
    segments.update(torch.tensor([1, -1, -1, 0, 0], dtype=torch.int32))
    assert (segments.sorted_tokens.data_ptr(), segments.tiles.data_ptr()) == buffers
    assert segments.sorted_tokens.tolist()[:3] == [3, 4, 0]
    tile_slot, tile_start, tile_rows = segments.tile_list(16).tolist()
    assert (tile_slot[:3], tile_start[:2], tile_rows[:2]) == ([0, 1, -1], [0, 2], [2, 1])
