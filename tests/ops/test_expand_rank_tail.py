"""The expand's rank-tail chunk (ranks off the ``block_k`` grid) loads ``B``'s storage padding
whole when the storage rank is a multiple of ``block_k`` (16-byte loads; the padding is finite by
the storage contract and meets zeros of ``h``), and masks it otherwise (the chunk would leave the
storage). Both against the fp32 reference, with large finite values in the padding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from lora_cases import TOLERANCE, reference_output, relative_error

from valora.ops import triton_lora
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.tile_config import ExpandConfig, ShrinkConfig, TileConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILES = TileConfig(ShrinkConfig(16, 16, 16, 1, 4, 2), ExpandConfig(16, 32, 16, 4, 2))


@pytest.mark.parametrize(("storage", "masked"), [(32, False), (24, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_tail_reads_the_padding_only_where_storage_allows(
        monkeypatch: pytest.MonkeyPatch, storage: int, masked: bool, dtype: torch.dtype) -> None:
    flags: list[bool] = []
    real = triton_lora.launcher

    def spy(fn: Any) -> Any:
        launch = real(fn)
        if fn is not triton_lora.lora_expand_kernel:
            return launch

        class Recorder:
            def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
                def call(*args: Any, **kwargs: Any) -> None:
                    flags.append(kwargs["MASK_B_K"])
                    launch[grid](*args, **kwargs)
                return call
        return Recorder()

    monkeypatch.setattr(triton_lora, "launcher", spy)
    monkeypatch.setattr(triton_lora, "select_tile_config",
                        lambda *args, **kwargs: (TILES, "test"))
    ranks = [1, 5, 13, 16, storage - 3]  # tails of 1..15 columns, one whole chunk, a long tail
    slices = (40, 24)
    weights = make_slot_weights(ranks, 48, slices, dtype, DEVICE, seed=7, max_rank=storage)
    slots = torch.tensor([0, 1, -1, 2, 3, 4, 4, -1, 1], dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(len(slots), 48, generator=generator).to(DEVICE, dtype)
    y = (0.1 * torch.randn(len(slots), sum(slices), generator=generator)).to(DEVICE, dtype)
    out = y.clone()
    lora_apply(out, x, weights, prepare_lora_batch(slots, len(ranks), "triton"))
    ref = reference_output(y, x, weights, slots.cpu(), len(ranks))
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert flags and set(flags) == {masked}
