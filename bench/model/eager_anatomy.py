"""Where an eager (prefill) step's time goes on a GPU: host enqueue time vs GPU busy time, per
mode, and the host cost of one LoRA op split into valora's Python and Triton's launch path.

The serving runs showed eager steps dominating latency and the refitted cost model charges
≈ 17 ms per LoRA launch in an eager step at 7B shapes (``valora/orchestrator/profiles``); this
script measures that directly instead of through a regression.

Per step (``StepProfiler`` builds it exactly as the engine would; median of ``--repeats``), once
with valora's direct kernel launches (``valora.ops.launch``) and once through Triton's own path
(mixed steps once more with the correction in the same LoRA op, ``LoRAConfig.fuse_correction``,
rows ``*_fused``):

- ``host_ms``: wall time until ``forward`` + logits *returns*, the GPU warm and idle at the
  start (when the step is host-bound the launch queue never fills, so this is the host's
  enqueue time; when GPU-bound it approaches ``wall_ms``);
- ``gpu_kernel_ms`` / ``gpu_kernels``: the summed duration and number of GPU kernels of one more
  run under ``torch.profiler`` (the GPU's busy time; wall minus it is time the GPU waited);
- ``wall_ms``: synchronised wall time (what the engine sees).

Per LoRA op (7B projection shapes, ``--op-tokens`` tokens, one rank-16 adapter): host µs of
``lora_apply`` (everything), of its kernel launches alone (``launch_shrink`` + ``launch_expand``
with the tile choice made; direct and through Triton's path), of ``prepare_lora_batch``, and of
the base ``F.linear`` the op rides on, each enqueued behind a GPU sleep.

    PYTHONPATH=$PWD python bench/model/eager_anatomy.py --model /tmp/model7b --out /tmp/anatomy
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from valora.ops import triton_lora
from valora.ops.launch import fast_launch_enabled, set_fast_launch
from valora.ops.lora import lora_apply, prepare_lora_batch
from valora.ops.lora_problems import make_slot_weights
from valora.ops.timing import host_time_per_call
from valora.orchestrator.cost_model import RowWork, StepSpec
from valora.orchestrator.merge import WeightSwitcher
from valora.orchestrator.modes import Mode
from valora.orchestrator.profiling import adapter_name
from valora.orchestrator.step_profiler import SWITCH_TARGETS, StepProfiler

RANK = 16
OP_SHAPES = {"qkv": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)),
             "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}


def step_specs(tokens: int) -> dict[str, StepSpec]:
    """One prefill of ``tokens`` per mode (mixed: two rows, one of the merged adapter)."""
    a, b = adapter_name(RANK, 0), adapter_name(RANK, 1)
    half = tokens // 2

    def row(name: str | None, n: int) -> RowWork:
        return RowWork(name, RANK if name else 0, n, n)

    return {
        "base": StepSpec((row(None, tokens),)),
        "unmerged": StepSpec((row(a, tokens),)),
        "unmerged_2rows": StepSpec((row(a, half), row(b, half))),
        "merged": StepSpec((row(a, tokens),), Mode.MERGED, a, RANK),
        "mixed_2rows": StepSpec((row(a, half), row(b, half)), Mode.MIXED, a, RANK),
    }


def load_profiler(model_dir: str, num_pages: int, fuse_correction: bool = False
                  ) -> tuple[Any, StepProfiler]:
    """The dummy-weight bf16 model at ``model_dir`` on CUDA and a ``StepProfiler`` over it with
    the two rank-``RANK`` adapters ``step_specs`` uses, on all seven projections."""
    from valora.engine.components import attention_backend_for
    from valora.models.loader import load_model

    device = torch.device("cuda")
    model = load_model(model_dir, dtype=torch.bfloat16, device=device, load_format="dummy",
                       attention_backend=attention_backend_for("auto", device))
    names = [adapter_name(RANK, 0), adapter_name(RANK, 1)]
    profiler = StepProfiler(model, names, dict.fromkeys(names, RANK),
                            dict.fromkeys(names, SWITCH_TARGETS["all"]), "auto",
                            num_pages=num_pages, fuse_correction=fuse_correction)
    return model, profiler


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median host / wall milliseconds of ``fn`` (module docstring), then one run under
    ``torch.profiler`` for the GPU kernel time and the number of kernels."""
    host, wall = [], []
    fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"host_ms": 1e3 * statistics.median(host), "wall_ms": 1e3 * statistics.median(wall),
            "gpu_kernel_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
            "gpu_kernels": len(kernels)}


def op_rows(tokens: int, calls: int) -> list[dict[str, object]]:
    """Host cost of one LoRA op and its parts at 7B shapes (module docstring)."""
    return [op_row(name, in_features, widths, tokens, calls)
            for name, (in_features, widths) in OP_SHAPES.items()]


def op_row(name: str, in_features: int, widths: tuple[int, ...], tokens: int,
           calls: int) -> dict[str, object]:
    """One projection's row of ``op_rows``."""
    device = torch.device("cuda")
    weights = make_slot_weights([[RANK] * len(widths)] * 4, in_features, widths, torch.bfloat16,
                                device, 0, max_rank=64)
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device=device)
    y = torch.zeros(tokens, sum(widths), dtype=torch.bfloat16, device=device)
    base = torch.randn(sum(widths), in_features, dtype=torch.bfloat16, device=device)
    slots = torch.zeros(tokens, dtype=torch.int32, device=device)
    batch = prepare_lora_batch(slots, 4, "triton", active_slots=[0])
    segments = batch.backend_data
    ranks = triton_lora.active_slice_ranks(weights, segments)
    config, _ = triton_lora.choose_tile_config(x, weights, segments, ranks)
    live = triton_lora.live_flat_rank(ranks, weights.max_rank) if ranks else None
    h = triton_lora.launch_shrink(x, weights, segments, config.shrink, live)

    def launches() -> None:
        triton_lora.launch_shrink(x, weights, segments, config.shrink, live)
        triton_lora.launch_expand(h, y, weights, segments, config.expand, 1.0)

    set_fast_launch(False)
    try:
        triton_path = host_time_per_call(launches, calls)
    finally:
        set_fast_launch(True)
    return {
        "op": name, "tokens": tokens, "fast_launch": fast_launch_enabled(),
        "lora_apply_us": host_time_per_call(lambda: lora_apply(y, x, weights, batch), calls),
        "launch_shrink_expand_us": host_time_per_call(launches, calls),
        "launch_shrink_expand_triton_path_us": triton_path,
        "prepare_batch_us": host_time_per_call(
            lambda: prepare_lora_batch(slots, 4, "triton", active_slots=[0]), calls // 10),
        "base_linear_us": host_time_per_call(lambda: torch.nn.functional.linear(x, base), calls),
    }


def print_cprofile(profiler: StepProfiler, spec: StepSpec, tokens: int) -> None:
    """cProfile's top host functions of ten runs of ``spec`` (Python-level attribution)."""
    import cProfile
    import pstats

    batch = profiler.batch(spec)
    profiler._run(batch)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        profiler._run(batch)
    torch.cuda.synchronize()
    prof.disable()
    print(f"== cProfile, 10 unmerged steps of {tokens} tokens")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint dir (make_model_dir.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", default="128,512,1024")
    parser.add_argument("--op-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--cprofile", action="store_true",
                        help="only print cProfile's top functions of one unmerged step per length")
    args = parser.parse_args()
    model, profiler = load_profiler(args.model, num_pages=200)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "sha": args.sha, "torch": torch.__version__}
    lines = []
    switcher = WeightSwitcher(model.lora_base_weights(), model.lora_slot_map())
    with torch.inference_mode():
        for tokens in (int(t) for t in args.tokens.split(",")):
            if args.cprofile:
                print_cprofile(profiler, step_specs(tokens)["unmerged"], tokens)
                continue
            for mode, spec in step_specs(tokens).items():
                if spec.mode.has_merged_adapter:
                    switcher.merge(profiler.slot_of[spec.merged_adapter], "all")
                batch = profiler.batch(spec)
                for fast in (True, False):
                    set_fast_launch(fast)
                    row = {"kind": "step", "mode": mode, "tokens": tokens, **meta,
                           "fast_launch": fast,
                           **timed(lambda b=batch: profiler._run(b), args.repeats)}
                    lines.append(row)
                    print(f"step {mode:15} T={tokens:5} {'fast  ' if fast else 'triton'}: "
                          f"host {row['host_ms']:7.2f} ms  wall {row['wall_ms']:7.2f} ms  "
                          f"kernels {row['gpu_kernel_ms']:7.2f} ms ({row['gpu_kernels']})",
                          flush=True)
                set_fast_launch(True)
                if spec.mode is Mode.MIXED:  # the correction inside the rows' own LoRA op
                    profiler.fuse_correction = True
                    profiler._batches.pop(spec, None)
                    fused = profiler.batch(spec)
                    row = {"kind": "step", "mode": f"{mode}_fused", "tokens": tokens, **meta,
                           "fast_launch": True,
                           **timed(lambda b=fused: profiler._run(b), args.repeats)}
                    lines.append(row)
                    print(f"step {mode + '_fused':15} T={tokens:5} fast  : host "
                          f"{row['host_ms']:7.2f} ms  wall {row['wall_ms']:7.2f} ms  kernels "
                          f"{row['gpu_kernel_ms']:7.2f} ms ({row['gpu_kernels']})", flush=True)
                    profiler.fuse_correction = False
                    profiler._batches.pop(spec, None)
                if spec.mode.has_merged_adapter:
                    switcher.unmerge()
        for row in op_rows(args.op_tokens, 200):
            lines.append({"kind": "op", **meta, **row})
            print(f"op {row['op']:8} T={row['tokens']}: lora_apply {row['lora_apply_us']:6.1f} µs"
                  f"  shrink+expand launches {row['launch_shrink_expand_us']:6.1f} µs"
                  f" (Triton's path {row['launch_shrink_expand_triton_path_us']:6.1f})"
                  f"  prepare {row['prepare_batch_us']:6.1f} µs"
                  f"  F.linear {row['base_linear_us']:5.1f} µs", flush=True)
    (args.out / "eager_anatomy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
