"""The LoRA delta of a layer beside its base GEMM, on a second CUDA stream.

A decode-sized LoRA op is latency-bound: a shrink and an expand launch of a few microseconds each,
whose fixed cost (launch, pipeline fill, one partial wave) does not shrink with the adapter bytes.
In series with the base GEMM that fixed cost is paid 4 × layers times a step. Overlapped, the
step's critical path holds the base GEMM and one elementwise add per layer instead::

    main:  ─ x ──────────── y = x Wᵀ + b ─────────── wait(side) ─ y += δ ─▶
                 ╲ fork                                   ╱ join
    side:         δ = 0;  δ += LoRA(x) [; δ −= LoRA_m(x)]

Invariants (what makes this safe with PyTorch's stream-ordered caching allocator, eagerly and
under CUDA-graph capture, where fork and join become graph edges):

- ``δ`` is allocated on the main stream before the fork and written only after the side stream
  has waited on the main stream, so no earlier main-stream user of its memory can still be
  running; the main stream waits on the side stream before reading ``δ`` or dropping ``x``.
- Buffers the LoRA op allocates inside (its shrink output) belong to the side stream and are used
  only there.
- Results equal the serial path's up to one extra rounding of ``δ`` to the activation dtype
  (exact in fp32).

Memory: one ``[T, out_features]`` activation-dtype buffer per call, which is why layers only
overlap up to a token count (``FusedLinear.lora_overlap_tokens``; the engine sets it from
``LoRAConfig.overlap_max_tokens``) — decode steps and small prefills, where the fixed cost
dominates.

**The delta into the residual** (``VALORA_LORA_INTO_RESIDUAL=1``, ``set_lora_into_residual``;
off by default until measured on a GPU). ``o_proj`` and ``down_proj`` feed the residual add of the
next RMSNorm, ``norm(y + residual)``, so their delta can be added to ``residual`` instead of
``y``: ``FusedLinear.forward(..., lora_into=residual)``. Overlapped, the side stream then
accumulates straight into ``residual`` (which nothing else reads before the norm), and the two
layers' ``δ`` buffer, its zeroing and the ``y += δ`` on the main stream's critical path go away —
128 of the 256 small elementwise kernels (a zero and an add per op) a 32-layer decode step spends
on the overlap. Same sum, another rounding order: ``(residual + δ) + y`` instead of
``(y + δ) + residual``.
"""

from __future__ import annotations

import os

import torch

_SIDE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def lora_side_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    """The process-wide side stream of ``device`` for LoRA deltas (one per priority).

    ``priority`` follows CUDA: lower is more urgent (``-1`` high, ``0`` default). One stream per
    device keeps every layer's LoRA work in order on it, as the data dependencies require.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, priority)
    stream = _SIDE_STREAMS.get(key)
    if stream is None:
        stream = torch.cuda.Stream(device=torch.device("cuda", index), priority=priority)
        _SIDE_STREAMS[key] = stream
    return stream


_INTO_RESIDUAL: list[bool | None] = [None]


def set_lora_into_residual(on: bool | None) -> None:
    """Add ``o_proj`` / ``down_proj``'s LoRA deltas into the residual from now on (module
    docstring); None: ``VALORA_LORA_INTO_RESIDUAL``'s choice (``"1"`` on, else off). Read when a
    model runs, so graphs captured afterwards keep it; benchmarks compare both in one process."""
    _INTO_RESIDUAL[0] = on


def lora_into_residual() -> bool:
    """Whether the model adds ``o_proj`` / ``down_proj``'s LoRA deltas into the residual."""
    on = _INTO_RESIDUAL[0]
    if on is None:
        return os.environ.get("VALORA_LORA_INTO_RESIDUAL", "0") in ("1", "true", "on")
    return on
