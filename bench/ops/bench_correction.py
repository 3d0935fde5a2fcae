"""Mixed mode in one LoRA op vs the two-op form, at LLaVA-1.5-7B projection shapes.

For each layer (qkv 4096→4096+4096+4096, o 4096→4096, gate_up 4096→2×11008, down 11008→4096) and
each step shape — decode batches of 1 / 8 / 32 / 64 rows and a 512-token prefill — with 8
resident adapters of ranks {8, 16, 32, 64} and one of them (rank 16) merged, the rows cycling
over the other adapters and a quarter of them base rows (as ``plan_lora_batches`` plans a mixed
step): GPU time under CUDA graphs (``valora.ops.timing``) of

- ``two_ops``: ``lora_apply`` of the rows' own adapters, then of the correction with multiplier
  -1 (what the engine runs without ``LoRAConfig.fuse_correction``), and
- ``fused``: one ``lora_apply`` with ``correction_slots`` (one shrink + one expand launch),

both against the fp32 twin (relative error), plus the host time per call of each eager
(``bench/model/eager_anatomy.py``'s method: calls queued behind a GPU sleep). Prints a table
and writes JSONL. ``--device cpu`` runs tiny shapes under ``TRITON_INTERPRET=1`` (a smoke test:
no timing claims).

    PYTHONPATH=$PWD python bench/ops/bench_correction.py --out /tmp/correction.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from valora.ops.lora import LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.timing import host_time_per_call, time_calls
from valora.orchestrator.modes import Mode, plan_lora_batches

LAYERS = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)),
          "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}
TINY_LAYERS = {"qkv": (48, (32, 16, 16)), "down": (40, (24,))}
RANKS = (16, 8, 32, 64, 8, 16, 32, 64)  # slot 0 (rank 16) is the merged adapter
STEPS = {"decode1": (1, 1), "decode8": (8, 1), "decode32": (32, 1), "decode64": (64, 1),
         "prefill512": (1, 512)}
TINY_STEPS = {"decode8": (8, 1), "prefill24": (1, 24)}


def step_slots(rows: int, tokens_per_row: int) -> tuple[list[int], list[int] | None]:
    """Per-token (own, correction) slots of a mixed step with slot 0 merged: rows cycle over
    slots 1..7, every fourth row is a base row, every fifth the merged adapter's."""
    adapters = []
    for row in range(rows):
        slot = -1 if row % 4 == 3 else 0 if row % 5 == 4 else 1 + row % (len(RANKS) - 1)
        adapters += [slot] * tokens_per_row
    return plan_lora_batches(adapters, 0, mode=Mode.MIXED)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def measure(layer: str, in_features: int, widths: tuple[int, ...], step: str, rows: int,
            tokens_per_row: int, device: torch.device) -> dict[str, object]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = make_slot_weights([[r] * len(widths) for r in RANKS], in_features, widths, dtype,
                                device, seed=0, max_rank=64)
    own, correction = step_slots(rows, tokens_per_row)
    assert correction is not None
    tokens = len(own)
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, in_features, generator=generator, device=device).to(dtype)
    y0 = torch.zeros(tokens, sum(widths), dtype=dtype, device=device)
    slots = torch.tensor(own, dtype=torch.int32, device=device)
    corr = torch.tensor(correction, dtype=torch.int32, device=device)
    active = {s for s in own if s >= 0}
    num_slots = weights.num_slots

    def batches() -> tuple[object, object, object]:
        fused = prepare_lora_batch(slots, num_slots, "triton", active_slots=active,
                                   correction_slots=corr, correction_slot=0)
        first = prepare_lora_batch(slots, num_slots, "triton", active_slots=active)
        second = prepare_lora_batch(corr, num_slots, "triton", active_slots={0})
        return fused, first, second

    fused, first, second = batches()
    out_fused, out_two = y0.clone(), y0.clone()

    def run_fused() -> None:
        lora_apply(out_fused, x, weights, fused)  # type: ignore[arg-type]

    def run_two() -> None:
        lora_apply(out_two, x, weights, first)  # type: ignore[arg-type]
        lora_apply(out_two, x, weights, second, scale_multiplier=-1.0)  # type: ignore[arg-type]

    ref = y0.float().cpu().clone()
    fp32 = LoRASlotWeights(weights.lora_a.float().cpu(), weights.lora_b.float().cpu(),
                           weights.ranks.cpu(), weights.scales.cpu(), widths,
                           [list(r) for r in weights.ranks_cpu])
    lora_apply(ref, x.float().cpu(), fp32,
               prepare_lora_batch(slots.cpu(), num_slots, "reference",
                                  correction_slots=corr.cpu()))
    run_fused()
    run_two()
    row: dict[str, object] = {
        "layer": layer, "step": step, "tokens": tokens, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "err_fused": relative_error(out_fused.cpu(), ref),
        "err_two_ops": relative_error(out_two.cpu(), ref)}
    timing_fused = time_calls([run_fused], device, repeats=20)
    timing_two = time_calls([run_two], device, repeats=20)
    row["fused_us"], row["two_ops_us"] = timing_fused.median_us, timing_two.median_us
    if device.type == "cuda":
        row["fused_host_us"], row["two_ops_host_us"] = host_time_per_call(run_fused), host_time_per_call(run_two)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sha", default=os.environ.get("VALORA_GIT_SHA", ""))
    args = parser.parse_args()
    device = torch.device(args.device)
    layers, steps = (LAYERS, STEPS) if device.type == "cuda" else (TINY_LAYERS, TINY_STEPS)
    rows = []
    for layer, (in_features, widths) in layers.items():
        for step, (num_rows, per_row) in steps.items():
            row = measure(layer, in_features, widths, step, num_rows, per_row, device)
            row["sha"] = args.sha
            rows.append(row)
            print(f"{layer:8} {step:11} fused {row['fused_us']:9.1f} µs  two ops "
                  f"{row['two_ops_us']:9.1f} µs  ratio {row['two_ops_us'] / row['fused_us']:5.2f}"
                  f"  err {row['err_fused']:.1e} / {row['err_two_ops']:.1e}"
                  + (f"  host {row['fused_host_us']:6.1f} / {row['two_ops_host_us']:6.1f} µs"
                     if "fused_host_us" in row else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
