"""The expand's rank-tail chunk (ranks off the ``block_k`` grid) loads ``B``'s storage padding
whole when the storage rank is a multiple of a ``block_k`` of ≤ 16 (16-byte loads; the padding is
finite by the storage contract and meets zeros of ``h``); otherwise it masks ``B`` at the rank
rounded up to 8 when the storage rank is a multiple of 8 (``lora_launch_args.expand_b_mask``: wide
chunks read ≤ 7 padding columns, not the whole chunk), else at the exact rank (the chunk would
leave the storage). Every form against the fp32 reference, with large finite values in the
padding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error

from valora.ops import triton_lora
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.ops.lora_launch_args import expand_b_mask
from valora.ops.lora_problems import make_slot_weights
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiles(block_k: int) -> TileConfig:
    return TileConfig(ShrinkConfig(16, 16, 16, 1, 4, 2), ExpandConfig(16, 32, block_k, 4, 2))


@pytest.mark.parametrize(("block_k", "storage", "mask"), [
    (16, 32, (False, 1)),  # whole tail chunk
    (16, 24, (True, 8)),   # the chunk would leave the storage: masked, rounded up to 8
    (32, 64, (True, 8)),   # wide chunk: masked, rounded up to 8
    (64, 64, (True, 8)),   # the whole storage rank in one chunk
    (32, 20, (True, 1)),   # storage not a multiple of 8: the exact rank
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_tail_reads_the_padding_only_where_storage_allows(
        monkeypatch: pytest.MonkeyPatch, block_k: int, storage: int, mask: tuple[bool, int],
        dtype: torch.dtype) -> None:
    flags: list[tuple[bool, int]] = []
    real = triton_lora.launcher

    def spy(fn: Any) -> Any:
        launch = real(fn)
        if fn is not triton_lora.lora_expand_kernel:
            return launch

        class Recorder:
            def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
                def call(*args: Any, **kwargs: Any) -> None:
                    flags.append((kwargs["MASK_B_K"], kwargs["B_ALIGN"]))
                    launch[grid](*args, **kwargs)
                return call
        return Recorder()

    monkeypatch.setattr(triton_lora, "launcher", spy)
    monkeypatch.setattr(triton_lora, "select_tile_config",
                        lambda *args, **kwargs: (_tiles(block_k), "test"))
    ranks = [1, 5, 13, 16, storage - 3]  # tails of 1..15 columns, one whole chunk, a long tail
    slices = (40, 24)
    weights = make_slot_weights(ranks, 48, slices, dtype, DEVICE, seed=7, max_rank=storage,
                                b_layout="column")  # the masks of the contiguous layout
    slots = torch.tensor([0, 1, -1, 2, 3, 4, 4, -1, 1], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), 48, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(len(slots), sum(slices), generator=generator)).to(DEVICE, dtype)
    out = y.clone()
    lora_apply(out, x, weights, prepare_lora_batch(slots, len(ranks), "triton"))
    ref = reference_output(y, x, weights, slots.cpu(), len(ranks))
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert flags and set(flags) == {mask}
    assert flags[0] == tuple(expand_b_mask(storage, block_k).values())
