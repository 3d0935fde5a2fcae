"""Eager steps with and without piecewise CUDA graphs (``valora.engine.piecewise_graphs``) at
LLaVA-1.5-7B shapes: host time, wall time and GPU kernel time per step and mode, the logits'
difference between the two paths, and what capturing cost (seconds, pool memory).

Steps are built by ``StepProfiler`` exactly as the engine builds them (one prefill of ``T``
tokens, or two rows of ``T/2``; rank-16 adapters on all seven projections; mixed steps with the
correction in the same LoRA op, the engine's default) and timed by ``eager_anatomy.timed``
(median of ``--repeats``; host = until the forward + logits return, wall = synchronised).
A ``T`` that is not a bucket runs padded to the next one (e.g. 700 → 768).

    PYTHONPATH=$PWD python bench/model/piecewise_bench.py --model /tmp/m7 --out /tmp/pw
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eager_anatomy import load_profiler, step_specs, timed

from valora.orchestrator.merge import WeightSwitcher
from valora.orchestrator.modes import Mode

MODES = ("base", "unmerged", "unmerged_2rows", "mixed_2rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint dir (make_model_dir.py)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", default="128,512,700,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sha", default="unknown")
    args = parser.parse_args()
    device = torch.device("cuda")
    model, profiler = load_profiler(args.model, num_pages=400, fuse_correction=True)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    torch.cuda.synchronize()
    before, started = torch.cuda.memory_reserved(device), time.perf_counter()
    assert profiler.enable_piecewise_graphs(max(tokens_list))
    torch.cuda.synchronize()
    piecewise = profiler.piecewise
    assert piecewise is not None
    meta = {"gpu": torch.cuda.get_device_name(), "sha": args.sha, "torch": torch.__version__}
    capture = {"kind": "capture", **meta, "seconds": time.perf_counter() - started,
               "reserved_mib": (torch.cuda.memory_reserved(device) - before) / 2**20,
               "buckets": list(piecewise.buckets), "pieces": piecewise.num_pieces,
               "graphs": piecewise.num_pieces * len(piecewise.buckets) * len(piecewise.variants)}
    print(f"capture: {capture['graphs']} graphs in {capture['seconds']:.1f} s, "
          f"{capture['reserved_mib']:.0f} MiB reserved", flush=True)
    rows: list[dict[str, object]] = [capture]
    switcher = WeightSwitcher(model.lora_base_weights(), model.lora_slot_map())
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for tokens in tokens_list:
            specs = step_specs(tokens)
            for mode in MODES:
                spec = specs[mode]
                if spec.mode.has_merged_adapter:
                    switcher.merge(profiler.slot_of[spec.merged_adapter], "all")
                batch = profiler.batch(spec)
                saved, profiler.piecewise = profiler.piecewise, None
                eager_logits = profiler._run(batch).float()
                eager = timed(lambda b=batch: profiler._run(b), args.repeats)
                profiler.piecewise = saved
                assert piecewise.can_run(batch), (mode, tokens)
                graph_logits = profiler._run(batch).float()
                graphed = timed(lambda b=batch: profiler._run(b), args.repeats)
                err = float((graph_logits - eager_logits).norm() / eager_logits.norm())
                row = {"kind": "step", **meta, "mode": mode, "tokens": tokens,
                       "bucket": piecewise.bucket_for(tokens), "eager": eager,
                       "piecewise": graphed, "logits_rel_err": err,
                       "host_speedup": eager["host_ms"] / graphed["host_ms"],
                       "wall_speedup": eager["wall_ms"] / graphed["wall_ms"]}
                rows.append(row)
                print(f"{mode:15} T={tokens:5} (bucket {row['bucket']:5}): wall "
                      f"{eager['wall_ms']:6.2f} → {graphed['wall_ms']:6.2f} ms "
                      f"({row['wall_speedup']:.2f}×), host {eager['host_ms']:6.2f} → "
                      f"{graphed['host_ms']:6.2f} ms, kernels {eager['gpu_kernel_ms']:6.2f} → "
                      f"{graphed['gpu_kernel_ms']:6.2f} ms, err {err:.1e}", flush=True)
                if spec.mode is Mode.MIXED or spec.mode.has_merged_adapter:
                    switcher.unmerge()
    (args.out / "piecewise_steps.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
