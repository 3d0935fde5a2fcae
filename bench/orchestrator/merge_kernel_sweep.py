"""Whole-model merge time of the Triton low-rank update kernel over tile configurations.

LLaVA-1.5-7B decoder shapes (32 layers × q, k, v, o, gate, up, down; bf16), one adapter of rank
16 and 64: for each ``(BLOCK_M, BLOCK_N, num_warps)`` the merge of all
224 modules (one launch per module) is captured in a CUDA graph and its replays are timed with
CUDA events (median of 7), as ``WeightSwitcher`` replays merges — host launch time is out of the
figure (the first sweeps timed eager launches by wall clock, which mixed it in). Next to it:
cuBLAS ``addmm_`` (also graph-replayed) and the read + write floor at a copy bandwidth measured
in the same run. Prints a table; writes ``merge_sweep.jsonl`` under ``--out``.

    PYTHONPATH=$PWD python3 bench/orchestrator/merge_kernel_sweep.py --out "$OUT"   # H200, ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from valora.ops.merge_kernel import lowrank_update_triton

# (BLOCK_M, BLOCK_N, num_warps). Several column tiles per program (the next W tile loaded ahead)
# were in the sweep of 396c3b3 and lost: bench/results/serve/merge-sweep-graphs-h200.jsonl.
CONFIGS = [(64, 256, 8), (64, 128, 4), (32, 256, 4), (32, 128, 4), (128, 64, 4), (64, 64, 4),
           (16, 128, 4), (32, 64, 4), (128, 128, 8)]


def graph_ms(fn: Callable[[], None], repeats: int = 7) -> float:
    """Median ms of CUDA-graph replays of ``fn`` (run once eagerly first: compiles, warms)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def wall_ms(fn: Callable[[], None], repeats: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    h, i, layers = 4096, 11008, 32
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]
    weights = [torch.randn(m, n, device=dev, dtype=torch.bfloat16) for _ in range(layers)
               for (m, n) in shapes]
    total = sum(w.numel() * w.element_size() for w in weights)
    buf = torch.empty(total // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(buf)
    copy_ms = wall_ms(lambda: dst.copy_(buf), 5)
    tbps = 2 * total / copy_ms / 1e9
    floor_ms = 2 * total / (tbps * 1e9)
    rows = []
    name = torch.cuda.get_device_name()
    for rank in (16, 64):
        factors = [((torch.randn(w.shape[0], rank, device=dev) * 1e-3).bfloat16(),
                    torch.randn(rank, w.shape[1], device=dev).bfloat16()) for w in weights]

        def addmm(factors: list[tuple[torch.Tensor, torch.Tensor]] = factors) -> None:
            for w, (b, a) in zip(weights, factors, strict=True):
                w.addmm_(b, a, alpha=0.5)

        results = {"addmm_": graph_ms(addmm)}
        for bm, bn, nw in CONFIGS:
            def triton_merge(bm: int = bm, bn: int = bn, nw: int = nw,
                             factors: list[tuple[torch.Tensor, torch.Tensor]] = factors) -> None:
                for w, (b, a) in zip(weights, factors, strict=True):
                    lowrank_update_triton(w, b, a, 0.5, block_m=bm, block_n=bn, num_warps=nw)
            try:
                results[f"triton {bm}x{bn} w{nw}"] = graph_ms(triton_merge)
            except Exception as exc:  # a configuration that does not compile: say so, go on
                print(f"triton {bm}x{bn} w{nw}: {type(exc).__name__}: {exc}"[:200])
        for impl, ms in results.items():
            row = {"device": name, "rank": rank, "impl": impl, "ms": round(ms, 3),
                   "floor_ms": round(floor_ms, 3), "x_floor": round(ms / floor_ms, 2),
                   "copy_tbps": round(tbps, 3), "affected_gb": round(total / 1e9, 2)}
            rows.append(row)
    (args.out / "merge_sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: copy {tbps:.2f} TB/s, affected {total / 1e9:.2f} GB, floor {floor_ms:.2f} ms")
    print("| rank | impl | ms | x floor |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['rank']} | {r['impl']} | {r['ms']:.2f} | {r['x_floor']:.2f} |")


if __name__ == "__main__":
    main()
