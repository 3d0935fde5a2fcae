"""The one-launch K/V cache write (``fused_kernels.write_kv``, opt-in via
``VALORA_FUSED_KV_WRITE`` / ``fused_select.set_fused_kv_write``) against the two
``index_copy_`` it replaces: dtypes (cache in the inputs' dtype, bit for bit, and narrower), GQA
widths, ``v`` a column slice of a fused qkv output (rows strided), scattered slots; off by
default; the twin whenever the kernel cannot take the tensors (a tiny model's forward with it
on: ``test_fused_layers.py``).

Kernel cases run on the CPU under Triton's interpreter and again on CUDA (``gpu`` variants)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from kernel_devices import DEVICES

from valora.layers import attention, fused_kernels, fused_select
from valora.layers.attention import write_kv_cache


@pytest.fixture(autouse=True)
def _modes() -> Iterator[None]:
    fused_select.set_fused_layers_mode(None)
    fused_select.set_fused_kv_write(None)
    yield
    fused_select.set_fused_layers_mode(None)
    fused_select.set_fused_kv_write(None)


def _case(device: str, dtype: torch.dtype, cache_dtype: torch.dtype, heads: int = 2,
          dim: int = 16, tokens: int = 5, pages: int = 4, page_size: int = 4
          ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(heads * dim + tokens)
    q_width, kv_width = 4 * heads * dim, heads * dim
    qkv = torch.randn(tokens, q_width + 2 * kv_width, generator=generator).to(device, dtype)
    key = qkv[:, q_width:q_width + kv_width].contiguous().view(tokens, heads, dim)
    value = qkv[:, q_width + kv_width:].view(tokens, heads, dim)  # rows strided by the qkv width
    cache = tuple(torch.randn(pages, page_size, heads, dim, generator=generator)
                  .to(device, cache_dtype) for _ in range(2))
    slots = torch.randperm(pages * page_size, generator=generator)[:tokens].to(device)
    return key, value, cache, slots  # type: ignore[return-value]


def _twin(key: torch.Tensor, value: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
          slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    expected = (cache[0].clone(), cache[1].clone())
    fused_select.set_fused_kv_write(False)
    write_kv_cache(key, value, expected, slots)
    return expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "cache_dtype"), [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize(("heads", "dim"), [(2, 16), (3, 8), (8, 128)])
def test_one_launch_equals_two_index_copies(device: str, dtype: torch.dtype,
                                            cache_dtype: torch.dtype, heads: int,
                                            dim: int) -> None:
    key, value, cache, slots = _case(device, dtype, cache_dtype, heads, dim)
    expected = _twin(key, value, cache, slots)
    fused_select.set_fused_layers_mode("on")
    fused_select.set_fused_kv_write(True)
    calls: list[int] = []
    real = fused_kernels.write_kv

    def spy(*args: object) -> None:
        calls.append(1)
        real(*args)  # type: ignore[arg-type]

    fused_kernels.write_kv = spy  # type: ignore[assignment]
    try:
        write_kv_cache(key, value, cache, slots)
    finally:
        fused_kernels.write_kv = real  # type: ignore[assignment]
    assert calls == [1]
    # Same dtype: a copy, bit for bit. A narrowing cast rounds to nearest even on the GPU as
    # ``Tensor.to`` does; Triton's CPU interpreter may land one unit of the last place away.
    ulp = 0 if dtype == cache_dtype or device == "cuda" else 2 ** -7
    torch.testing.assert_close(cache[0], expected[0], rtol=ulp, atol=0)
    torch.testing.assert_close(cache[1], expected[1], rtol=ulp, atol=0)


def test_on_by_default_and_the_twin_where_the_kernel_cannot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("", True), ("auto", True), ("1", True), ("off", False),
                            ("0", False)):
        monkeypatch.setenv(fused_select.KV_WRITE_ENV_VAR, value)
        assert fused_select.fused_kv_write() is expected, value
        fused_select.set_fused_kv_write(None)
    monkeypatch.delenv(fused_select.KV_WRITE_ENV_VAR)
    assert fused_select.fused_kv_write() is True
    fused_select.set_fused_kv_write(None)
    # On by default yet CPU tensors keep the twin in the default (auto) layer mode.
    fused_select.set_fused_layers_mode("auto")
    key, value, cache, slots = _case("cpu", torch.float32, torch.float32)
    assert not attention._kv_kernel_fits(key, value, *cache)
    fused_select.set_fused_layers_mode(None)
    monkeypatch.setenv(fused_select.KV_WRITE_ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="VALORA_FUSED_KV_WRITE"):
        fused_select.fused_kv_write()

    def boom(*args: object) -> None:
        raise AssertionError("the kernel must not run")

    monkeypatch.setattr(fused_kernels, "write_kv", boom)
    fused_select.set_fused_kv_write(True)
    fused_select.set_fused_layers_mode("off")  # mode off: the twin
    key, value, cache, slots = _case("cpu", torch.float32, torch.float32)
    expected = _twin(key, value, cache, slots)
    fused_select.set_fused_kv_write(True)
    write_kv_cache(key, value, cache, slots)
    torch.testing.assert_close(cache[0], expected[0])
    fused_select.set_fused_layers_mode("on")  # a key whose rows are not contiguous: the twin
    strided = key.transpose(1, 2).contiguous().transpose(1, 2)
    assert not attention._kv_kernel_fits(strided, value, *cache)
    write_kv_cache(strided, value, cache, slots)
    torch.testing.assert_close(cache[1], expected[1])
