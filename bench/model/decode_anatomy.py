"""Where a graph-replayed decode step's GPU time goes, by kernel category (issue 4's bars).

The decode bars compare a whole step with its memory floor: at batch 32 the base step sat at
1.30× (≈ 1.65 ms above the floor) and 32 distinct adapters at 1.62× (≈ 3.6 ms of LoRA tax over
≈ 1.1 ms of adapter bytes, `bench/results/model/h200-09e2e14/`). This script says where those
milliseconds are: it captures the decode graphs as ``bench_decode.py`` does (dummy weights at
LLaVA-1.5-7B shapes, ``"triton"`` attention, fused layers, context ≈ 600), replays a step per
scenario under ``torch.profiler`` and sums the kernels it sees per category (``CATEGORIES``, by
kernel name; the LM head's GEMM counts with ``gemm``), per step; the gap is the step's
CUDA-event time minus the kernels' sum (launch gaps inside the graph, idle SMs between
dependent kernels). The same step is also profiled eagerly, for its kernel count and in case the
profiler sees no kernels inside graph replays, and (path ``known``) eagerly with the step's
adapter slots known on the host, as the engine's eager steps have them: the LoRA tiles then come
from the table bucket of the adapters' own ranks and count, where a captured graph (and the
``eager`` path) must take the worst case (storage rank, one adapter per token). Per category, its floor where the bytes are known
(the KV read is charged to ``attention``; ``kv_write`` launches are what fusing the cache write
into the rotary kernel would remove):
``gemm`` (decoder + LM-head weights), ``attention`` (the KV read), ``lora`` (the distinct
adapters' true-rank bytes).

    python bench/model/decode_anatomy.py --out DIR [--sha SHA] [--batches 32] [--steps 5]
        [--layers fused,fused_kv] [--tiny CKPT_DIR]   # a tiny checkpoint on the CPU: exercises the script, no claims

Writes ``DIR/decode_anatomy.jsonl`` (one row per scenario × batch × path, with every category,
and the 15 most expensive kernel names) and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl
from bench_decode import CONFIG_DIR, CONTEXT, MAX_RANK, NUM_SLOTS, ceilings, time_ms
from fused_layers import LABELS

import valora.layers.attention_triton  # noqa: F401  (registers "triton")
from valora.engine.cuda_graph import CudaGraphRunner
from valora.layers.fused_select import fused_layers, set_fused_kv_write
from valora.models.loader import load_model
from valora.ops.lora import prepare_lora_batch

# First match wins; names are CUDA kernel names (or ATen op names on the CPU).
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("lora_shrink", r"lora_shrink"),
    ("lora_expand", r"lora_expand"),
    ("kv_write", r"index_copy|kv_write"),  # new K/V into the paged cache (two launches per layer, or one fused)
    ("attention", r"attention|attn|paged|flash|decode_kernel|sdpa"),
    ("gemm", r"gemm|xmma|cutlass|nvjet|cublas|matmul|mm_|addmm|linear|Kernel2"),
    ("norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|gelu|act_and_mul|mul_and"),
    ("sampling", r"argmax|softmax|topk|sort|sampl|max_"),
    ("lora_metadata", r"cumsum|bincount|scatter|index|arange|segment|searchsorted"),
    ("copy_fill", r"copy|fill|memcpy|memset|elementwise|vectorized"),
)


def category_of(name: str) -> str:
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "other"


def profile_kernels(step: Any, device: torch.device, steps: int) -> tuple[dict[str, float],
                                                                          dict[str, int],
                                                                          dict[str, float]]:
    """Per-step µs and count per category, and µs per kernel name, over ``steps`` calls."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    wanted = (torch.autograd.DeviceType.CUDA if device.type == "cuda"
              else torch.autograd.DeviceType.CPU)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    names: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type != wanted:
            continue
        if device.type == "cpu" and not event.name.startswith("aten::"):
            continue
        # A kernel event's device_time_total is its duration; ATen ops (CPU) nest, so this
        # double-counts on the CPU, which only exercises the script.
        us = (event.device_time_total if device.type == "cuda" else event.cpu_time) / steps
        category = category_of(event.name)
        times[category] += us
        counts[category] += 1
        names[event.name] += us
    return dict(times), {k: round(v / steps) for k, v in counts.items()}, dict(names)


def floors_us(model: Any, step: wl.StepSetup, ranks: list[int], slots: list[int],
              rate: float) -> dict[str, float]:
    return {"gemm": wl.decoder_bytes(model) / rate * 1e6,
            "attention": wl.kv_bytes(model, step.context_tokens) / rate * 1e6,
            "lora": wl.adapter_bytes(model, ranks, slots) / rate * 1e6}


def anatomy(model: Any, pool: wl.KVPool, ranks: list[int], batches: list[int], steps: int,
            rate: float, common: dict[str, Any], sink: Any) -> list[dict[str, Any]]:
    """One row per scenario × batch × path under the per-layer op mode already set."""
    device = model.device
    rows = []
    runner = None
    if device.type == "cuda":
        runner = CudaGraphRunner(model, max(batches), max_context=4096, page_size=wl.PAGE_SIZE,
                                 num_lora_slots=NUM_SLOTS, variants=("base", "lora"),
                                 buckets=batches)
        runner.capture()
    for batch in batches:
        contexts = [CONTEXT - 10 + (7 * i) % 21 for i in range(batch)]
        for scenario in ("base", "one_adapter_r16", "mixed32_ranks"):
            pool.reset()
            slots = wl.scenario_slots(scenario, batch)
            setup = wl.decode_step(model, pool, contexts, slots, NUM_SLOTS, "triton")
            fb = setup.batch

            def eager(fb: Any = fb) -> None:
                with torch.inference_mode():
                    model.compute_logits(model.forward(fb))

            paths = [("eager", eager)]
            if fb.lora is not None:  # the host knows the slots: tiles keyed by their ranks
                hinted = dataclasses.replace(fb, lora=prepare_lora_batch(
                    fb.lora.token_slots, NUM_SLOTS, "triton",
                    active_slots=sorted({s for s in slots if s >= 0})))

                def eager_known(fb: Any = hinted) -> None:
                    with torch.inference_mode():
                        model.compute_logits(model.forward(fb))

                paths.append(("known", eager_known))
            if runner is not None:
                def graphed(fb: Any = fb) -> None:
                    with torch.inference_mode():
                        model.compute_logits(runner.run(fb))

                paths.insert(0, ("graph", graphed))
            for path, call in paths:
                step_us = statistics.median(time_ms(call, device, 10)) * 1e3
                times, counts, names = profile_kernels(call, device, steps)
                kernel_us = sum(times.values())
                top = sorted(names.items(), key=lambda kv: -kv[1])[:15]
                row = {**common, "scenario": scenario, "batch": batch, "path": path,
                       "step_us": step_us, "kernel_us": kernel_us,
                       "gap_us": step_us - kernel_us, "category_us": times,
                       "category_kernels": counts,
                       "floor_us": floors_us(model, setup, ranks, slots, rate),
                       "top_kernels": [[name, us] for name, us in top]}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cats = [c for c, _ in CATEGORIES] + ["other"]
    lines = ["layers   scenario        batch path  |   step    gap | "
             + " ".join(f"{c[:11]:>11}" for c in cats)]
    for row in rows:
        lines.append(f"{row['layers']:<8} {row['scenario']:<15} {row['batch']:>5} {row['path']:<5} | "
                     f"{row['step_us']:6.0f} {row['gap_us']:6.0f} | "
                     + " ".join(f"{row['category_us'].get(c, 0.0):11.0f}" for c in cats))
    lines.append("µs per step; floors (µs): " + "; ".join(
        f"{r['scenario']}@{r['batch']}: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                      r["floor_us"].items())
        for r in rows if r["path"] == rows[0]["path"] and r["layers"] == rows[0]["layers"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--batches", default="32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", default="fused",
                        help="comma list of per-layer op modes (bench_decode's labels: fused, "
                             "fused_kv, stock, ...)")
    parser.add_argument("--tiny", type=Path, help="a tiny checkpoint: exercise the script only")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    model = load_model(str(args.tiny or CONFIG_DIR), dtype=dtype, device=device,
                       load_format="dummy", attention_backend="triton")
    model.init_lora(NUM_SLOTS, MAX_RANK)
    ranks = wl.fill_adapter_slots(model, NUM_SLOTS, seed=1)
    pages_per_seq = -(-(CONTEXT + 11) // wl.PAGE_SIZE)
    pool = wl.KVPool(model, max(batches) * pages_per_seq + 1, seed=2)
    rate = ceilings(device)["copy_bytes_per_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    common = {"device": name, "git_sha": args.sha, "model": "tiny" if args.tiny
              else "llava-1.5-7b-dummy", "dtype": str(dtype), "copy_bytes_per_s": rate}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with (args.out / "decode_anatomy.jsonl").open("w") as sink:
        for label in args.layers.split(","):
            mode = LABELS[label].mode if device.type == "cuda" else LABELS["stock"].mode
            set_fused_kv_write(LABELS[label].kv_write)
            try:
                with fused_layers(mode):
                    rows += anatomy(model, pool, ranks, batches, args.steps, rate,
                                    {**common, "layers": label}, sink)
            finally:
                set_fused_kv_write(None)
    print(table(rows))


if __name__ == "__main__":
    main()
