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
"""

from __future__ import annotations

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
