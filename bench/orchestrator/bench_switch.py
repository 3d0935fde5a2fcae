"""Switch-time benchmark: merge / unmerge of one adapter on all seven projections of every layer.

valora's ``WeightSwitcher`` (merge: one in-place ``addmm_`` per module; unmerge: one ``copy_``
from the pristine device copy) against PEFT's ``merge`` / ``unmerge`` on the same shapes and card,
next to the read + write floor of the affected weights at the device copy bandwidth measured in
the same run. Shapes: LLaVA-1.5-7B's decoder (``bench/model/llava-1.5-7b/config.json``: hidden
4096, intermediate 11008, 32 layers, 32 KV heads), dummy bf16 weights; ``--tiny`` shrinks them for
a CPU smoke test.

Timing: wall clock around the call with a device synchronize before and after (what the engine
pays per switch, host overhead included), median of ``--repeats`` after warm-up; CUDA-event time of
the same calls is recorded too. Correctness is checked before timing: one merged module against the
fp32 reference (relative error < 1e-2), and bit-exact restore after unmerge.

Writes ``switch.jsonl`` (one row per implementation, rank and operation) and ``switch.md`` under
``--out``; prints the table last. Bar (issue 5): valora switch time <= 1.3x floor.

    PYTHONPATH=$PWD python bench/orchestrator/bench_switch.py --out "$OUT"        # H200, ~1 min
    PYTHONPATH=$PWD python bench/orchestrator/bench_switch.py --tiny --out /tmp/sw  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from valora.ops.lora import LoRASlotWeights
from valora.orchestrator.merge import ModuleKey, WeightSwitcher

CONFIG = Path(__file__).resolve().parents[1] / "model" / "llava-1.5-7b" / "config.json"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BAR = 1.3


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    kv: int
    layers: int

    def fused(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], int]]:
        """fused linear -> (modules, slice widths, in_features), as valora's decoder fuses them."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {"qkv_proj": (("q_proj", "k_proj", "v_proj"), (h, kv, kv), h),
                "o_proj": (("o_proj",), (h,), h),
                "gate_up_proj": (("gate_proj", "up_proj"), (i, i), h),
                "down_proj": (("down_proj",), (h,), i)}

    def module_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of one projection."""
        for modules, widths, in_features in self.fused().values():
            if name in modules:
                return widths[modules.index(name)], in_features
        raise KeyError(name)


def load_shapes(tiny: bool) -> Shapes:
    if tiny:
        return Shapes(hidden=128, intermediate=352, kv=128, layers=2)
    text = json.loads(CONFIG.read_text())["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return Shapes(text["hidden_size"], text["intermediate_size"],
                  text["num_key_value_heads"] * head_dim, text["num_hidden_layers"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int,
              before: Callable[[], Any] | None = None) -> tuple[list[float], list[float]]:
    """Wall seconds (synchronized) and CUDA-event seconds per call; ``before`` runs untimed."""
    walls: list[float] = []
    events: list[float] = []
    for _ in range(repeats):
        if before is not None:
            before()
        sync(device)
        if device.type == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            end_event.record()
        sync(device)
        walls.append(time.perf_counter() - start)
        if device.type == "cuda":
            events.append(start_event.elapsed_time(end_event) / 1e3)
    return walls, events


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int) -> float:
    """Device copy rate in bytes moved (read + written) per second, median of ``repeats``."""
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    walls, events = time_call(lambda: dst.copy_(src), device, repeats)
    seconds = statistics.median(events or walls)
    return 2.0 * num_bytes / seconds


def build_valora(shapes: Shapes, ranks: list[int], device: torch.device, dtype: torch.dtype,
                 seed: int, graphs: bool = True) -> tuple[dict[ModuleKey, torch.Tensor],
                                                          WeightSwitcher]:
    """Fused base weights (random), one LoRA slot per rank on all seven projections."""
    torch.manual_seed(seed)
    base: dict[ModuleKey, torch.Tensor] = {}
    slot_map: dict[ModuleKey, tuple[LoRASlotWeights, int]] = {}
    max_rank = max(ranks)
    for layer in range(shapes.layers):
        for modules, widths, in_features in shapes.fused().values():
            weight = torch.empty(sum(widths), in_features, dtype=dtype, device=device)
            weight.normal_(0.0, 0.02)
            slots = LoRASlotWeights.empty(len(ranks), max_rank, in_features, widths, dtype, device)
            slots.lora_a.normal_(0.0, 0.02)
            slots.lora_b.normal_(0.0, 0.02)
            for slot, rank in enumerate(ranks):
                slots.ranks[slot] = rank
                slots.ranks_cpu[slot] = [rank] * len(widths)
                slots.scales[slot] = 2.0
            offset = 0
            for j, (name, width) in enumerate(zip(modules, widths, strict=True)):
                base[(layer, name)] = weight[offset:offset + width]
                slot_map[(layer, name)] = (slots, j)
                offset += width
    return base, WeightSwitcher(base, slot_map, graphs=graphs)


def reference_error(merged: torch.Tensor, pristine: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, scale: float) -> float:
    """Max relative error of a merged module against the fp32 reference ``P + s·B·A``."""
    merged, pristine, a, b = (t.detach() for t in (merged, pristine, a, b))
    reference = pristine.float() + scale * (b.float() @ a.float())
    return float((merged.float() - reference).abs().max() / reference.abs().max())


def bench_valora(shapes: Shapes, ranks: list[int], device: torch.device, dtype: torch.dtype,
                 repeats: int, floor_rate: float, graphs: bool = True) -> list[dict[str, Any]]:
    """``valora`` (merges replayed from a CUDA graph after the first two, the default) or
    ``valora-eager`` (``graphs=False``: one Python launch per module every time)."""
    impl = "valora" if graphs else "valora-eager"
    base, switcher = build_valora(shapes, ranks, device, dtype, seed=0, graphs=graphs)
    rows: list[dict[str, Any]] = []
    probe: ModuleKey = (0, "q_proj")
    for slot, rank in enumerate(ranks):
        name = f"r{rank}"
        switcher.merge(slot, name)
        slots, j = switcher._slots[probe]
        offset = sum(slots.slice_widths[:j])
        error = reference_error(base[probe], switcher.pristine(probe),
                                slots.lora_a[slot, j, :rank],
                                slots.lora_b[slot, offset:offset + slots.slice_widths[j], :rank],
                                2.0)
        switcher.unmerge()
        sync(device)
        exact = all(torch.equal(base[key], switcher.pristine(key)) for key in base)
        affected = switcher.affected_bytes(slot)
        floor = 2.0 * affected / floor_rate
        merge_walls, merge_events = _merge_times(switcher, slot, name, device, repeats)
        unmerge_walls, unmerge_events = _unmerge_times(switcher, slot, name, device, repeats)
        for op, walls, events in (("merge", merge_walls, merge_events),
                                  ("unmerge", unmerge_walls, unmerge_events)):
            rows.append(_row(impl, op, rank, affected, floor, walls, events,
                             {"rel_error_vs_fp32": error, "restore_bit_exact": exact,
                              "num_modules": len(switcher._deltas(slot)),
                              "pristine_bytes": switcher.pristine_bytes}))
    del base, switcher
    return rows


def _merge_times(switcher: WeightSwitcher, slot: int, name: str, device: torch.device,
                 repeats: int) -> tuple[list[float], list[float]]:
    for _ in range(2):  # warm-up
        switcher.merge(slot, name)
        switcher.unmerge()
    return time_call(lambda: switcher.merge(slot, name), device, repeats,
                     before=lambda: switcher.unmerge() if switcher.merged_adapter else None)


def _unmerge_times(switcher: WeightSwitcher, slot: int, name: str, device: torch.device,
                   repeats: int) -> tuple[list[float], list[float]]:
    if switcher.merged_adapter is not None:
        switcher.unmerge()
    return time_call(switcher.unmerge, device, repeats, before=lambda: switcher.merge(slot, name))


def bench_peft(shapes: Shapes, ranks: list[int], device: torch.device, dtype: torch.dtype,
               repeats: int, floor_rate: float) -> list[dict[str, Any]]:
    """PEFT 0.2x: ``inject_adapter_in_model`` on a stack of plain ``nn.Linear`` at the same shapes;
    merge / unmerge every LoRA layer (what ``PeftModel.merge_adapter`` / ``unmerge_adapter`` do)."""
    try:
        import peft
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as exc:
        print(f"PEFT not available: {exc}", file=sys.stderr)
        return []
    rows: list[dict[str, Any]] = []
    for rank in ranks:
        torch.manual_seed(1)
        layers = torch.nn.ModuleList()
        for _ in range(shapes.layers):
            layer = torch.nn.Module()
            for name in MODULES:
                out_features, in_features = shapes.module_shape(name)
                linear = torch.nn.Linear(in_features, out_features, bias=False, device=device,
                                         dtype=dtype)
                torch.nn.init.normal_(linear.weight, 0.0, 0.02)
                layer.add_module(name, linear)
            layers.append(layer)
        model = torch.nn.Module()
        model.add_module("layers", layers)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(MODULES),
                            init_lora_weights=False)
        model = inject_adapter_in_model(config, model)
        model.to(device=device, dtype=dtype)
        tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        probe = layers[0].q_proj
        pristine = probe.base_layer.weight.detach().clone()
        for tuner in tuners:
            tuner.merge()
        error = reference_error(probe.base_layer.weight.detach(), pristine,
                                probe.lora_A["default"].weight, probe.lora_B["default"].weight,
                                float(probe.scaling["default"]))
        for tuner in tuners:
            tuner.unmerge()

        def merge_all(ts: list[Any] = tuners) -> None:
            for tuner in ts:
                tuner.merge()

        def unmerge_all(ts: list[Any] = tuners) -> None:
            for tuner in ts:
                tuner.unmerge()

        merge_all()
        unmerge_all()
        affected = sum(t.base_layer.weight.numel() * t.base_layer.weight.element_size()
                       for t in tuners)
        floor = 2.0 * affected / floor_rate
        merge = time_call(merge_all, device, repeats, before=unmerge_all)
        unmerge = time_call(unmerge_all, device, repeats, before=merge_all)
        drift = float((probe.base_layer.weight.detach().float() - pristine.float()).abs().max())
        for op, (walls, events) in (("merge", merge), ("unmerge", unmerge)):
            rows.append(_row(f"peft-{peft.__version__}", op, rank, affected, floor, walls, events,
                             {"rel_error_vs_fp32": error, "num_modules": len(tuners),
                              "max_abs_drift_after_unmerges": drift}))
        del model, layers, tuners, probe, pristine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _row(impl: str, op: str, rank: int, affected: int, floor: float, walls: list[float],
         events: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    median = statistics.median(walls)
    return {"impl": impl, "op": op, "rank": rank, "affected_bytes": affected,
            "floor_s": floor, "median_s": median, "min_s": min(walls), "max_s": max(walls),
            "gpu_median_s": statistics.median(events) if events else None,
            "ratio_to_floor": median / floor, "repeats": len(walls), **extra}


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| impl | op | rank | affected GB | floor ms | median ms | GPU ms | x floor | "
             "rel err vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = f"{r['gpu_median_s'] * 1e3:.2f}" if r["gpu_median_s"] is not None else "-"
        lines.append(f"| {r['impl']} | {r['op']} | {r['rank']} | {r['affected_bytes'] / 1e9:.2f} "
                     f"| {r['floor_s'] * 1e3:.2f} | {r['median_s'] * 1e3:.2f} | {gpu} | "
                     f"{r['ratio_to_floor']:.2f} | {r['rel_error_vs_fp32']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    shapes = load_shapes(args.tiny)
    repeats = 3 if args.tiny else args.repeats
    copy_bytes = (1 << 22) if args.tiny else (4 << 30)
    rate = copy_bandwidth(device, copy_bytes, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; copy bandwidth {rate / 1e12:.3f} TB/s (read + write)", flush=True)
    rows = bench_valora(shapes, args.ranks, device, dtype, repeats, rate)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        rows += bench_valora(shapes, args.ranks, device, dtype, repeats, rate, graphs=False)
        torch.cuda.empty_cache()
    if not args.no_peft:
        rows += bench_peft(shapes, args.ranks, device, dtype, repeats, rate)
    common = {"benchmark": "switch", "device": name, "git_sha": git_sha(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "dtype": str(dtype),
              "shapes": shapes.__dict__, "copy_bytes_per_s": rate, "bar_x_floor": BAR}
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "switch.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps({**common, **row}) + "\n")
    verdict = [f"valora {r['op']} r{r['rank']}: {r['ratio_to_floor']:.2f}x floor "
               f"({'meets' if r['ratio_to_floor'] <= BAR else 'misses'} the {BAR}x bar)"
               for r in rows if r["impl"] == "valora"]
    summary = (f"# Switch time (merge / unmerge, all 7 projections x {shapes.layers} layers)\n\n"
               f"Device **{name}**, bf16 dummy weights, shapes {shapes.__dict__}; copy bandwidth "
               f"{rate / 1e12:.3f} TB/s (bytes read + written per s); floor = 2 x affected bytes "
               f"/ that rate. Median wall time (synchronized) of {repeats} calls.\n\n"
               f"{table(rows)}\n\n" + "\n".join(f"- {v}" for v in verdict) + "\n")
    (args.out / "switch.md").write_text(summary)
    print(table(rows))
    print("\n".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
