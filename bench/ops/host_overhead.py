"""Host time of valora's own Python on the Triton path, with nothing launched (CPU only).

1. One ``lora_apply`` with the kernel launches stubbed out: validation, effective rank, tile
   lookup, grids, scratch allocation — not Triton's launch path and nothing on a GPU. CPU
   tensors; the launcher believes the kernels are interpreted so that it accepts them.
2. ``valora.ops.launch.FastKernel``'s own work per launch of the expand kernel's signature (key,
   cache lookup) over a stand-in binary whose ``run`` does nothing.
3. Triton's ``next_power_of_2`` (a ``ConstexprFunction``) against the plain-Python helper the
   fused layers use.

    python bench/ops/host_overhead.py
"""

from __future__ import annotations

import time

import torch

from valora.ops import triton_lora
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights

LAYERS = {"q": (4096, (4096,)), "qkv": (4096, (4096, 4096, 4096)), "gate_up": (4096, (11008, 11008))}


class _NoLaunch:
    def __getitem__(self, grid: tuple[int, ...]) -> object:
        return lambda *args, **kwargs: None


def main() -> None:
    triton_lora.lora_shrink_kernel = _NoLaunch()  # type: ignore[assignment]
    triton_lora.lora_expand_kernel = _NoLaunch()  # type: ignore[assignment]
    triton_lora.kernels_interpreted = lambda: True
    tokens, calls = 128, 2000
    for name, (in_features, widths) in LAYERS.items():
        weights = make_slot_weights([[16] * len(widths)] * 4, in_features, widths, torch.bfloat16,
                                    "cpu", 0, max_rank=64)
        x = torch.randn(tokens, in_features, dtype=torch.bfloat16)
        y = torch.zeros(tokens, sum(widths), dtype=torch.bfloat16)
        batch = prepare_lora_batch(torch.zeros(tokens, dtype=torch.int32), 4, "triton")
        lora_apply(y, x, weights, batch)
        start = time.perf_counter()
        for _ in range(calls):
            lora_apply(y, x, weights, batch)
        per_op = (time.perf_counter() - start) / calls * 1e6
        print(f"{name:8} {tokens} tokens, one rank-16 adapter: {per_op:.1f} µs per op "
              "(valora's host work, kernel launches stubbed)")


class _Binary:
    function, packed_metadata = 1, 2

    def run(self, *args: object) -> None:
        pass


class _Compiler:
    """Stands in for a ``JITFunction`` of the expand kernel's signature (its real ``params``)."""

    def __init__(self) -> None:
        from valora.ops.lora_kernels import lora_expand_kernel

        self.params = lora_expand_kernel.params

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        return lambda *args, **kwargs: _Binary()


def fast_kernel_overhead(calls: int = 20000) -> float:
    """µs per ``FastKernel`` launch of the expand kernel's 27 runtime + 7 constexpr arguments."""
    from valora.ops import launch

    launch.current_stream = lambda device: 0  # type: ignore[assignment]
    launch._current_device = lambda: 0  # type: ignore[assignment]
    launch._hooks_set = lambda: False  # type: ignore[assignment]
    kernel = launch.FastKernel(_Compiler())
    t = [torch.zeros(16) for _ in range(8)]
    args = (*t, 40, 12, 2, 512 * 192, 3, 6, 9, 0, 4096, 8192, 12288, 12288, 0, 3, 64, 192, 12288,
            12288, 1.0)
    options = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, SPLIT_K=2, PRECISION="tf32",
                   UPCAST=False, CORRECTION=False, num_warps=4, num_stages=2)
    kernel[(100,)](*args, **options)
    start = time.perf_counter()
    for _ in range(calls):
        kernel[(100,)](*args, **options)
    assert kernel.num_direct_launches == calls
    return (time.perf_counter() - start) / calls * 1e6


def block_size_helpers(calls: int = 100000) -> tuple[float, float]:
    """µs per call of ``triton.next_power_of_2`` and of the fused layers' plain helper."""
    import triton

    from valora.layers.fused_kernels import _next_power_of_2

    timings = []
    for fn in (triton.next_power_of_2, _next_power_of_2):
        start = time.perf_counter()
        for _ in range(calls):
            fn(4096)
        timings.append((time.perf_counter() - start) / calls * 1e6)
    return timings[0], timings[1]


if __name__ == "__main__":
    main()
    print(f"FastKernel, expand kernel's signature: {fast_kernel_overhead():.1f} µs per launch "
          "(key + lookup; the binary's run stubbed)")
    triton_us, plain_us = block_size_helpers()
    print(f"next_power_of_2: Triton's {triton_us:.2f} µs, the fused layers' helper "
          f"{plain_us:.2f} µs per call")
