"""Where a serving run's time goes: the engine under ``torch.profiler`` on a burst of requests.

Builds the engine the serving benchmark uses (``valora bench serve``: dummy weights, random
adapters of mixed ranks, ``unmerged-fcfs``), warms it up off the clock (one request per adapter,
twice), then replays ``--requests`` requests arriving at once under the profiler and writes:

- ``profile_ops.txt``: the operators by total device time and by total host time (top 40 each);
- ``profile_summary.json``: the run's wall time, the engine's graph / eager step counts and
  their host wall seconds, tokens, and the profiler's device and host totals.

    python bench/model/profile_serving.py --model DIR --out DIR [--device cuda] [--requests 32]

DIR is a checkpoint directory (``bench/orchestrator/make_model_dir.py``). On the CPU (``--device
cpu``, a tiny model) it only exercises the script.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from valora.benchmarks.adapters import random_adapters
from valora.benchmarks.inprocess import run_inprocess, warm_up
from valora.benchmarks.workload import BenchWorkload, generate
from valora.engine.llm import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--policy", default="unmerged-fcfs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    paths = random_adapters(args.model, args.adapters, args.ranks, args.out / "adapters", 0.02)
    options: dict[str, object] = (
        {"dtype": "bfloat16", "num_pages": 4096, "max_num_seqs": 64, "max_loras": args.adapters,
         "max_cpu_loras": 64, "max_lora_rank": max(args.ranks)} if cuda
        else {"dtype": "float32", "max_loras": args.adapters, "max_lora_rank": max(args.ranks)})
    llm = LLM(model=args.model, adapters=paths, device=args.device, load_format="dummy",
              mode_policy=args.policy, **options)
    engine = llm.engine
    workload = BenchWorkload(num_requests=args.requests, rate_per_s=1e6,
                             adapters=tuple(paths), popularity="zipf", seed=3)
    burst = [replace(r, arrival_s=0.0) for r in generate(workload)]
    warm = [replace(burst[0], request_id=f"w-{name}", adapter=name) for name in paths]
    warm_up(engine, warm + burst[:8])
    warm_up(engine, [replace(r, request_id=f"w2-{r.request_id}") for r in burst])
    before = engine.stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        result = run_inprocess(engine, burst, run_tag="profiled")
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    after = engine.stats()
    events = prof.key_averages()
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = [
        "== by self device time ==",
        events.table(sort_by=device_key, row_limit=40, max_name_column_width=60),
        "== by self host time ==",
        events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60),
    ]
    (args.out / "profile_ops.txt").write_text("\n".join(tables))
    keys = ("graph_steps", "eager_steps", "graph_seconds", "eager_seconds", "graph_rows",
            "eager_tokens")
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "requests": args.requests, "failed": sum(1 for t in result.timings if t.error),
        "wall_s": wall, "run_wall_s": result.wall_s,
        **{key: float(after[key]) - float(before[key]) for key in keys},
        "profiler_device_s": sum(getattr(e, device_key) for e in events) / 1e6,
        "profiler_host_self_s": sum(e.self_cpu_time_total for e in events) / 1e6,
    }
    (args.out / "profile_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print("\n".join(line for line in tables[1].splitlines()[:18]))


if __name__ == "__main__":
    main()
