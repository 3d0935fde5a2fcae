"""Host time of one ``lora_apply`` on the Triton path with the kernel launches stubbed out.

Measures valora's own Python per LoRA op (validation, effective rank, tile lookup, grids,
scratch allocation) — not Triton's launch path and nothing on a GPU. CPU tensors; the launcher
believes the kernels are interpreted so that it accepts them.

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


if __name__ == "__main__":
    main()
