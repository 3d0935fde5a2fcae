"""The low-rank in-place update kernel against its PyTorch twin (CPU interpreter; GPU too)."""

from __future__ import annotations

import pytest
import torch

from valora.errors import ValoraError
from valora.ops.merge_kernel import (
    lowrank_update,
    lowrank_update_reference,
    lowrank_update_slot,
    lowrank_update_triton,
)
from valora.ops.triton_lora import kernels_interpreted

# CPU tensors only run the kernel under the interpreter (set suite-wide when there is no GPU).
DEVICES = (["cpu"] if kernels_interpreted() else []) + (["cuda"] if torch.cuda.is_available() else [])


def _case(m: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int,
          factor_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    fdt = factor_dtype or dtype
    w = torch.randn(m, n, generator=gen).to(dtype).to(device)
    b = (torch.randn(m, r, generator=gen) * 0.1).to(fdt).to(device)
    a = torch.randn(r, n, generator=gen).to(fdt).to(device)
    return w, b, a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(48, 80, 3), (130, 64, 16), (33, 257, 1), (64, 200, 64)])
def test_triton_matches_reference(device: str, dtype: torch.dtype,
                                  shape: tuple[int, int, int]) -> None:
    m, n, r = shape
    w, b, a = _case(m, n, r, dtype, device, seed=m * n + r)
    expected = w.clone()
    lowrank_update_reference(expected, b, a, alpha=-1.75)
    before = w.clone()
    lowrank_update_triton(w, b, a, alpha=-1.75, block_m=32, block_n=64, num_warps=4)
    ref = expected.double()
    if dtype == torch.float32:
        torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        # Same fp32 value up to summation order, one rounding: at most one unit in the last place.
        # (+1e-4: fp32 summation-order noise where W and the delta cancel)
        ulp = ref.abs() * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10) + 1e-4
        assert bool(((w.double() - ref).abs() <= ulp).all())
        if device == "cuda":  # the CPU interpreter truncates fp32 -> bf16 instead of rounding
            assert float((w != expected).double().mean()) < 0.01
    assert not torch.equal(w, before)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_mixed_factor_dtypes(device: str) -> None:
    w, b, a = _case(40, 72, 8, torch.bfloat16, device, seed=1, factor_dtype=torch.float32)
    wide_b = torch.zeros(40, 16, device=device)
    wide_b[:, :8] = b
    b_view = wide_b[:, :8]  # non-contiguous rank axis, as a slot slice is
    expected = w.clone()
    lowrank_update_reference(expected, b_view, a, alpha=0.5)
    lowrank_update(w, b_view, a, alpha=0.5, backend="triton")
    ulp = expected.double().abs() * 2.0**-7 + 1e-30
    assert bool(((w.double() - expected.double()).abs() <= ulp).all())


def test_bad_input_is_rejected() -> None:
    w, b, a = _case(8, 8, 2, torch.bfloat16, "cpu", seed=2)
    with pytest.raises(ValoraError, match="shapes disagree"):
        lowrank_update_triton(w, b[:4], a, 1.0)
    with pytest.raises(ValoraError, match="2-D"):
        lowrank_update_reference(w[0], b, a, 1.0)
    with pytest.raises(ValoraError, match="dtype"):
        lowrank_update_reference(w.to(torch.int32), b, a, 1.0)
    with pytest.raises(ValoraError, match="backend"):
        lowrank_update(w, b, a, 1.0, backend="cublas")


def _within_one_ulp(got: torch.Tensor, expected: torch.Tensor) -> bool:
    ref = expected.double()
    ulp = ref.abs() * (2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-10) + 1e-4
    return bool(((got.double() - ref).abs() <= ulp).all())


def _switcher_model(device: str, compute: str) -> tuple[dict, object]:
    """Two layers: q/k/v rows of a fused qkv weight (one slot storage with three slices) and an
    o weight of another shape; slot 1 holds an adapter with different ranks per module."""
    from valora.ops.lora import LoRASlotWeights
    from valora.orchestrator.merge import WeightSwitcher

    gen = torch.Generator().manual_seed(11)
    hidden, rank = 32, 8
    base, slot_map = {}, {}
    for layer in range(2):
        qkv = torch.randn(3 * hidden, hidden, generator=gen).bfloat16().to(device)
        o = torch.randn(hidden, 2 * hidden, generator=gen).bfloat16().to(device)
        qkv_slots = LoRASlotWeights.empty(2, rank, hidden, (hidden,) * 3, torch.bfloat16, device)
        o_slots = LoRASlotWeights.empty(2, rank, 2 * hidden, (hidden,), torch.bfloat16, device)
        for slots, ranks in ((qkv_slots, (8, 3, 5)), (o_slots, (6,))):
            for j, r in enumerate(ranks):
                slots.lora_a[1, j, :r] = torch.randn(r, slots.lora_a.shape[-1], generator=gen).bfloat16().to(device)
                slots.ranks[1, j] = r
                slots.ranks_cpu[1][j] = r
                slots.scales[1, j] = 1.5 - j
            slots.lora_b[1, :, :] = (torch.randn(slots.lora_b.shape[1], rank, generator=gen)
                                     * 0.1).bfloat16().to(device)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            base[(layer, name)] = qkv[j * hidden:(j + 1) * hidden]
            slot_map[(layer, name)] = (qkv_slots, j)
        base[(layer, "o_proj")] = o
        slot_map[(layer, "o_proj")] = (o_slots, 0)
    return base, WeightSwitcher(base, slot_map, compute=compute)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_switcher_slot_merge_matches_chunked_and_restores(device: str) -> None:
    fast_base, fast = _switcher_model(device, "triton")
    ref_base, ref = _switcher_model(device, "chunked")
    originals = {k: w.clone() for k, w in fast_base.items()}
    fast.merge(1, "a")  # type: ignore[attr-defined]
    ref.merge(1, "a")  # type: ignore[attr-defined]
    for key, weight in fast_base.items():
        assert _within_one_ulp(weight, ref_base[key]), key
        assert not torch.equal(weight, originals[key]), key
    fast.unmerge()  # type: ignore[attr-defined]
    for key, weight in fast_base.items():
        assert torch.equal(weight, originals[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rank", "sign"), [(5, 1.0), (16, -1.0), (0, 1.0), (40, 1.0)])
def test_slot_update_reads_rank_and_scale_on_the_device(device: str, rank: int,
                                                        sign: float) -> None:
    """Slot storage at rank 16; the slot's rank (clipped to the storage) and scale come from
    one-element device tensors; rank 0 leaves W bit-identical."""
    w, b, a = _case(48, 80, 16, torch.bfloat16, device, seed=rank + 3)
    scale = torch.tensor([1.75], device=device)
    rank_ref = torch.tensor([rank], dtype=torch.int32, device=device)
    expected = w.clone()
    used = min(rank, 16)
    if used:
        lowrank_update_reference(expected, b[:, :used], a[:used], sign * 1.75)
    lowrank_update_slot(w, b, a, scale, rank_ref, sign)
    if used == 0:
        assert torch.equal(w, expected)
    else:
        assert _within_one_ulp(w, expected)
    with pytest.raises(ValoraError, match="1 element"):
        lowrank_update_slot(w, b, a, scale, rank_ref.long(), sign)


@pytest.mark.parametrize("device", DEVICES)
def test_warm_up_compiles_without_touching_weights(device: str) -> None:
    base, switcher = _switcher_model(device, "triton")
    before = {k: w.clone() for k, w in base.items()}
    # two shapes (qkv slices, o) x rank blocks {16}: storage rank 8 -> one block each
    assert switcher.warm_up() == 2  # type: ignore[attr-defined]
    for key, weight in base.items():
        assert torch.equal(weight, before[key]), key
    _, chunked = _switcher_model(device, "chunked")
    assert chunked.warm_up() == 0  # type: ignore[attr-defined]
