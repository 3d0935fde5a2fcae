"""``upload_ints``' packing: one buffer, 16-byte-aligned pieces, the same values as one tensor per
list (the CUDA path packs, pins and copies once; its CPU half is tested here)."""

from __future__ import annotations

import pytest
import torch

from valora.engine.batch_builder import pack_ints, unpack_ints, upload_ints


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_pieces_are_aligned_views_with_the_lists_values(dtype: torch.dtype) -> None:
    lists = [[0, 3, 7], [], [5], list(range(9)), [2, 2]]
    flat, padded = pack_ints(dtype, lists)
    pieces = unpack_ints(flat, padded, lists)
    base = flat.data_ptr()
    for piece, values in zip(pieces, lists, strict=True):
        assert piece.dtype == dtype and piece.tolist() == values
        assert (piece.data_ptr() - base) % 16 == 0
        assert piece.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert sum(padded) == flat.numel()


def test_cpu_upload_builds_one_tensor_per_list() -> None:
    got = upload_ints(torch.int64, [[1, 2], [3]], torch.device("cpu"))
    assert [t.tolist() for t in got] == [[1, 2], [3]]
    assert all(t.dtype == torch.int64 for t in got)
