"""Asynchronous output processing or scheduling on a GPU: the same offline decode-bound
generation with ``SchedulerConfig.async_output_processing`` (``--mode outputs``, the default) or
``SchedulerConfig.async_scheduling`` (``--mode scheduling``) on and off, in one engine,
alternating.

The engine's host work per step (scheduling, batch building, sampling, detokenising, outputs)
runs while the GPU idles unless the step's device work covers it; async output processing moves
the detokenisation, stop strings and outputs of step N behind step N+1's launch
(``valora/engine/engine.py``); async scheduling moves all of it — scheduling and batch building
too — behind step N+1's launch. This measures what that buys end to end: ``--rows`` requests of
``--tokens`` greedy tokens each (EOS ignored, short prompts: the run is decode steps), wall time
per engine step and tokens per second, flag on vs off, ``--repeats`` alternating runs each (the
flag is switched between runs on the idle engine: same weights, graphs and caches). ``lora``
rows spread the requests over ``--adapters`` random adapters of ranks 8 / 16.

    python bench/model/async_outputs_gpu.py --model DIR --out DIR [--sha SHA] [--rows 32 64]
        [--tokens 128] [--repeats 3] [--mode outputs|scheduling]
        # DIR from bench/orchestrator/make_model_dir.py

Writes ``OUT/async_<mode>.jsonl`` (one row per scenario × rows × flag × repeat) and prints a
table last. ``--tiny``: the embedded default model on the CPU (exercises the script; on the CPU
nothing overlaps, so no claims).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from valora import LLM, SamplingParams
from valora.benchmarks.adapters import random_adapters


def run_once(llm: LLM, rows: int, tokens: int, adapters: list[str], asynchronous: bool,
             mode: str = "outputs") -> dict[str, float]:
    """One generation with the ``mode`` switch set to ``asynchronous``; the wall time, engine
    steps and generated tokens."""
    engine = llm.engine
    assert not engine.requests and not engine._deferred and engine._in_flight is None, \
        "the engine must be idle"
    if mode == "outputs":  # against the synchronous order (async scheduling is CUDA's default)
        engine._async_outputs, engine._async_scheduling = asynchronous, False
    else:
        engine._async_outputs, engine._async_scheduling = False, asynchronous
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    requests: list[Any] = [
        {"prompt": f"USER: question number {i} about the picture ASSISTANT:",
         **({"adapter": adapters[i % len(adapters)]} if adapters else {})}
        for i in range(rows)]
    steps_before = engine.num_steps
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(requests, params)
    wall = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = engine.num_steps - steps_before
    return {"wall_s": wall, "steps": steps, "tokens": generated,
            "ms_per_step": 1e3 * wall / steps, "tokens_per_s": generated / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the default model on the CPU")
    parser.add_argument("--mode", choices=("outputs", "scheduling"), default="outputs",
                        help="the switch compared: async output processing or scheduling")
    args = parser.parse_args()
    if args.tiny:
        options: dict[str, Any] = {"device": "cpu", "dtype": "float32", "max_loras": 4}
    else:
        options = {"device": "cuda", "dtype": "bfloat16", "load_format": "dummy",
                   "num_pages": 4096, "max_loras": 16, "max_lora_rank": 64}
    llm = LLM(model=args.model, max_num_seqs=max(args.rows), enable_prefix_caching=False,
              **options)
    names = []
    for name, path in random_adapters(args.model, args.adapters, ranks=(8, 16),
                                      std=0.02).items():
        llm.load_adapter(name, path)
        names.append(name)
    device = "cpu" if args.tiny else torch.cuda.get_device_name()
    common = {"device": device, "git_sha": args.sha, "model": args.model,
              "tokens_per_request": args.tokens, "mode": args.mode}
    for _, used in (("base", []), ("lora", names)):
        run_once(llm, 4, 8, used, False, args.mode)  # warm-up: compile, adapters into slots
        run_once(llm, 4, 8, used, True, args.mode)
    rows_out = []
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"async_{args.mode}.jsonl").open("w") as sink:
        for scenario, used in (("base", []), ("lora", names)):
            for rows in args.rows:
                for repeat in range(args.repeats):
                    for asynchronous in ((False, True) if repeat % 2 == 0 else (True, False)):
                        result = run_once(llm, rows, args.tokens, used, asynchronous,
                                          args.mode)
                        row = {**common, "scenario": scenario, "rows": rows,
                               "async_on": asynchronous, "repeat": repeat, **result}
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                        rows_out.append(row)
    print(f"{device}; async {args.mode}; {args.tokens} tokens per request, {args.repeats} "
          "alternating runs each")
    print("scenario rows | ms/step off  on  off/on | tokens/s off  on")
    for scenario in ("base", "lora"):
        for rows in args.rows:
            def median(flag: bool, key: str, rows: int = rows, scenario: str = scenario
                       ) -> float:
                return statistics.median(r[key] for r in rows_out if r["rows"] == rows
                                         and r["scenario"] == scenario
                                         and r["async_on"] == flag)
            off, on = median(False, "ms_per_step"), median(True, "ms_per_step")
            print(f"{scenario:8s} {rows:4d} | {off:7.3f} {on:7.3f} {off / on:6.3f} | "
                  f"{median(False, 'tokens_per_s'):8.0f} {median(True, 'tokens_per_s'):8.0f}")


if __name__ == "__main__":
    main()
