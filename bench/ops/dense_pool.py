"""Would dense GEMMs over a packed pool of every resident adapter beat ATMM at the decode step?

The 32-adapter decode bar of issue 4 is missed because the step's 256 small LoRA launches run
far from the copy rate (shrink ≈ 1.2 ms, expand ≈ 1.8 ms a step for ≈ 1.1 ms of adapter bytes;
``bench/ops/NOTES.md``). A different algorithm turns them into large GEMMs: store the resident
adapters' rows packed, without padding to the storage rank (``A_pool``: every slot's ``r_s`` rows
of ``A`` per slice, ``[ΣC, in]``; ``B_pool``: the matching rows of ``Bᵀ``, ``[C_j, w_j]`` per slice
``j``), then per layer::

    h = x @ A_poolᵀ                      # every token × every resident adapter: one GEMM
    h *= M                               # M[t, rows of slot s] = scale_s if slot(t) = s else 0
    y[:, slice j] += h[:, rows j] @ B_pool_j   # one GEMM a slice (cuBLAS, into the column view)

Bytes: every *resident* adapter's rows once (= the distinct adapters' bytes when every resident
adapter is in the batch, as in the bar's scenario; more when few are); compute is wasted on the
other adapters' rows, which decode has to spare. ``M`` depends only on the step's slots, so it is
built once per step. The shrink can also ride inside the base GEMM (``folded``: ``x @ [W;
A_pool]ᵀ``, the base weight allocated with the pool's rows below it) — no shrink launch at all.

Per scenario × layer of the model benchmark's decode step (``decode_tiles.py``'s problem: 32 slots
of ranks 8–64, 32 tokens; weights rotated past L2), timed under CUDA graphs: the base GEMM alone;
GEMM + ATMM (the shipped Triton op with the tiles a graph replay takes: the mix entry); GEMM +
dense; the folded GEMM + the dense expand; ATMM and dense alone. The LoRA tax of each is its
time minus the GEMM's. Every variant's output is checked against ATMM's first.

    python bench/ops/dense_pool.py --out $OUT/dense_pool.jsonl [--sha SHA] [--tiny]
"""

# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from decode_experiment import (
    gemm_point,
    output_ok,
    run_main,
    time_variant,
    tolerance_of,
)

from valora.ops.lora import LoRASlotWeights


@dataclass
class Pool:
    """Every resident slot's rows, packed: ``a`` ``[ΣC, in]`` (slice after slice), ``b[j]``
    ``[C_j, w_j]`` (Bᵀ rows of slice ``j``), ``offsets[j]``: slice ``j``'s first row in ``a``."""

    a: torch.Tensor
    b: list[torch.Tensor]
    offsets: list[int]
    row_slot: list[torch.Tensor]
    """Per slice, the slot of each row."""


def pack(weights: LoRASlotWeights) -> Pool:
    a_rows, b_rows, offsets, row_slot, at = [], [], [], [], 0
    col = 0
    for j, width in enumerate(weights.slice_widths):
        a_j, b_j, owner = [], [], []
        for s, ranks in enumerate(weights.ranks_cpu):
            r = ranks[j]
            a_j.append(weights.lora_a[s, j, :r])
            b_j.append(weights.lora_b[s, col:col + width, :r].t())
            owner += [s] * r
        offsets.append(at)
        a_rows.append(torch.cat(a_j))
        b_rows.append(torch.cat(b_j).contiguous())
        row_slot.append(torch.tensor(owner, device=weights.lora_a.device))
        at += len(owner)
        col += width
    return Pool(torch.cat(a_rows).contiguous(), b_rows, offsets, row_slot)


def step_mask(pool: Pool, weights: LoRASlotWeights, token_slots: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """``M`` (module docstring): built once per step on the device."""
    parts = []
    for j, owner in enumerate(pool.row_slot):
        mine = token_slots.long().unsqueeze(1) == owner.unsqueeze(0)
        parts.append(mine * weights.scales[owner, j].unsqueeze(0))
    return torch.cat(parts, dim=1).to(dtype)


def dense_expand(h: torch.Tensor, mask: torch.Tensor, pool: Pool, y: torch.Tensor,
                 widths: tuple[int, ...]) -> None:
    h.mul_(mask)
    col = 0
    for j, width in enumerate(widths):
        lo = pool.offsets[j]
        rows = pool.b[j].shape[0]
        view = y[:, col:col + width]
        view.addmm_(h[:, lo:lo + rows], pool.b[j])
        col += width


def run_point(scenario: str, layer: str, layers: dict, device: torch.device, rate: float,
              tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    point = gemm_point(scenario, layer, layers, device, tokens, dtype)
    problem, lora, base, rounds = point.problem, point.lora, point.base, point.rounds
    weights, x, y, copies = problem.weights, problem.x, problem.y, problem.copies
    in_features, widths, out_features = point.in_features, point.widths, point.out_features
    gemm_copies = len(base)
    pools = [pack(w) for w in weights]
    folded = [torch.cat([base[i % gemm_copies], pools[i % copies].a]) for i in range(rounds)]
    pool_rows = pools[0].a.shape[0]
    pool_bytes = 2 * pool_rows * in_features + 2 * sum(b.numel() for b in pools[0].b)
    mask = step_mask(pools[0], weights[0], problem.token_slots, dtype)
    h = torch.empty(tokens, pool_rows, device=device, dtype=dtype)
    wide = torch.empty(tokens, out_features + pool_rows, device=device, dtype=dtype)

    def atmm(out: torch.Tensor, i: int) -> None:
        lora.apply(x, weights[i % copies], out)

    def dense(out: torch.Tensor, i: int) -> None:
        torch.mm(x, pools[i % copies].a.t(), out=h)
        dense_expand(h, mask, pools[i % copies], out, widths)

    def gemm(out: torch.Tensor, i: int) -> None:
        torch.mm(x, base[i % gemm_copies].t(), out=out)

    def folded_dense(out: torch.Tensor, i: int) -> None:
        torch.mm(x, folded[i].t(), out=wide)
        dense_expand(wide[:, out_features:], mask, pools[i % copies], wide[:, :out_features],
                     widths)

    variants: list[tuple[str, Callable[[torch.Tensor, int], None]]] = [
        ("gemm", gemm),
        ("gemm+atmm", lambda out, i: (gemm(out, i), atmm(out, i))),
        ("gemm+dense", lambda out, i: (gemm(out, i), dense(out, i))),
        ("folded+dense", folded_dense),
        ("atmm", atmm), ("dense", dense)]
    row = point.row(scenario, layer, tokens, rate)
    row.update(pool_rows=pool_rows, pool_floor_us=pool_bytes / rate * 1e6)
    want_lora = y.clone()
    atmm(want_lora, 0)
    want_gemm = torch.empty_like(y)
    gemm(want_gemm, 0)
    atmm(want_gemm, 0)
    tolerance = tolerance_of(dtype)
    output_ok(row["errors"], "dense", lambda out: dense(out, 0), y, want_lora, tolerance, "ATMM")

    def folded_out(out: torch.Tensor) -> None:
        folded_dense(out, 0)
        out.copy_(wide[:, :out_features])

    output_ok(row["errors"], "folded+dense", folded_out, y, want_gemm, tolerance, "GEMM + ATMM")
    for label, launch in variants:
        if label in row["errors"]:
            continue
        time_variant(row, label, launch, y, rounds, device)
    us = row["us"]
    for key in ("gemm+atmm", "gemm+dense", "folded+dense"):
        if key in us and "gemm" in us:
            us[f"tax {key}"] = us[key] - us["gemm"]
    return row


def columns(row: dict[str, Any]) -> dict[str, tuple[str, float]]:
    us = row["us"]
    picked = {k: (k, us[k]) for k in ("gemm", "tax gemm+atmm", "tax gemm+dense",
                                      "tax folded+dense", "atmm", "dense") if k in us}
    picked["pool floor"] = ("pool", row["pool_floor_us"])
    return picked


if __name__ == "__main__":
    run_main(__doc__ or "", run_point, columns, "lora_floor_us")
