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

**Deltas folded into the next op** (``VALORA_LORA_DELTA_FOLD=1``, ``set_lora_delta_fold``; off
by default until measured on a GPU). The overlap spends a zero (side stream) and an add (main
stream, after the join: on the critical path) per call — 256 small kernels a 32-layer decode
step. Three of a Llama layer's four fused linears feed an op that can take the delta itself:

- ``o_proj`` and ``down_proj`` feed the residual add of the next RMSNorm, ``norm(y + residual)``:
  ``FusedLinear.forward(..., lora_into=residual)`` lets the side stream accumulate straight into
  ``residual`` (which nothing else reads before the norm) — no delta buffer, zero or add;
- ``gate_up_proj`` feeds SiLU-and-mul: ``FusedLinear.forward_with_delta`` returns ``(y, δ)``
  after the join and ``silu_and_mul(y, extra=δ)`` adds it on the way in — no add.

That removes 160 of the 256 kernels (qkv's delta, read by the rotary, the K/V write and the
attention, is still added). Same sums, other rounding orders: ``(residual + δ) + y`` instead of
``(y + δ) + residual``; ``y + δ`` is rounded to the dtype before the activation either way.
"""

from __future__ import annotations

import os

import torch

from valora.errors import ValoraError

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


_DELTA_FOLD: list[bool | None] = [None]


DELTA_FOLD_ENV = "VALORA_LORA_DELTA_FOLD"
_DELTA_FOLD_VALUES = {"": False, "0": False, "off": False, "false": False,
                      "1": True, "on": True, "true": True}


def set_lora_delta_fold(on: bool | None) -> None:
    """Fold LoRA deltas into the next op from now on (module docstring, "Deltas folded into the
    next op"); None: ``VALORA_LORA_DELTA_FOLD``'s choice, re-read at the next call. Read when a
    model runs, so graphs captured afterwards keep it; benchmarks compare both in one process."""
    _DELTA_FOLD[0] = on


def lora_delta_fold() -> bool:
    """Whether the model folds its LoRA deltas into the next op (``set_lora_delta_fold``, else
    ``VALORA_LORA_DELTA_FOLD`` — ``1`` / ``on`` / ``true`` or ``0`` / ``off`` / ``false``, off
    when unset — read once and kept); another value is an error naming the choices."""
    on = _DELTA_FOLD[0]
    if on is None:
        env = os.environ.get(DELTA_FOLD_ENV, "").strip().lower()
        if env not in _DELTA_FOLD_VALUES:
            raise ValoraError(f"{DELTA_FOLD_ENV}={env!r}: choose one of 0, 1, on, off, true, "
                              "false")
        on = _DELTA_FOLD[0] = _DELTA_FOLD_VALUES[env]
    return on
