"""GPU timing of small ops for tuning and benchmarks: CUDA-graph replays, median of many.

``time_calls(calls)`` times a list of zero-argument callables that each run the op once on its
own input set (rotating inputs so repeated calls do not just hit L2): the calls are captured into
one CUDA graph, the graph is replayed ``repeats`` times between CUDA events, and the per-call
times (µs) of the replays come back. Launch overhead of Python is therefore out of the numbers,
for every method alike. On the CPU (the Triton interpreter in tests) it falls back to wall-clock
timing of plain calls, which is only good for exercising the tuner, never for claims.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call times in microseconds over the timed replays."""

    samples_us: tuple[float, ...]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    @property
    def min_us(self) -> float:
        return min(self.samples_us)

    @property
    def max_us(self) -> float:
        return max(self.samples_us)


def time_calls(calls: Sequence[Callable[[], object]], device: torch.device, repeats: int = 10,
               min_calls_per_graph: int = 8, warmup: int = 1,
               budget_us: float = 0.0) -> Timing:
    """Median-ready per-call timings of ``calls`` (see module docstring).

    ``budget_us`` > 0 caps the replays (never fewer than 3) so that their total stays near it,
    judged from one untimed replay: big ops get fewer repetitions.
    """
    if not calls:
        raise ValueError("time_calls needs at least one call")
    if device.type != "cuda":
        return _time_wallclock(calls, repeats)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            for call in calls:
                call()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    rounds = max(1, -(-min_calls_per_graph // len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    per_graph = rounds * len(calls)
    begin = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    if budget_us > 0:
        once_us = (time.perf_counter() - begin) * 1e6
        repeats = max(3, min(repeats, int(budget_us / max(once_us, 1.0))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    samples = tuple(s.elapsed_time(e) * 1e3 / per_graph for s, e in zip(starts, ends, strict=True))
    del graph
    return Timing(samples)


def _time_wallclock(calls: Sequence[Callable[[], object]], repeats: int) -> Timing:
    for call in calls:
        call()
    samples = []
    for _ in range(max(repeats, 1)):
        begin = time.perf_counter()
        for call in calls:
            call()
        samples.append((time.perf_counter() - begin) * 1e6 / len(calls))
    return Timing(tuple(samples))


def copy_rates(device: torch.device, nbytes: int, repeats: int = 10) -> dict[str, float]:
    """Bytes read + written per second moving ``nbytes`` of random bf16, three ways:
    ``copy_`` replayed from a CUDA graph (``copy_graph_memcpy``: the graph holds a memcpy node),
    an elementwise kernel (``torch.neg(out=)``) replayed from a graph (``copy_graph_kernel``)
    and ``copy_`` launched eagerly between CUDA events (``copy_eager``; wall clock on the CPU).
    A floor takes the fastest: on an H200 the memcpy node ran at 2.77 TB/s where the kernel ran
    at 4.29 and the eager copy at 4.15 (2026-11-29,
    ``bench/results/ops/h200-retune-b2f5d38/ops_bench.log``)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    graph = time_calls([lambda: dst.copy_(src)], device, repeats, min_calls_per_graph=4)
    kernel = time_calls([lambda: torch.neg(src, out=dst)], device, repeats,
                        min_calls_per_graph=4)
    return {"copy_graph_memcpy": 2 * nbytes / (graph.median_us * 1e-6),
            "copy_graph_kernel": 2 * nbytes / (kernel.median_us * 1e-6),
            "copy_eager": 2 * nbytes / (_eager_us(lambda: dst.copy_(src), device, repeats) * 1e-6)}


def _eager_us(call: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median µs of ``call`` launched eagerly, between CUDA events (wall clock on the CPU)."""
    if device.type != "cuda":
        return _time_wallclock([call], repeats).median_us
    call()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(max(repeats, 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


ROTATE_BYTES = 256 << 20
"""Bytes the rotating input sets of one timing should touch together: about five times the L2
cache of an H100 / H200 (50 MB), so that a call never finds its operands left in L2 by its own
previous replay (in a model step, every other layer's weights pass through L2 in between)."""
MAX_ROTATIONS = 32


def rotations_for(bytes_per_call: int, set_bytes: int = 0, target_bytes: int = ROTATE_BYTES,
                  limit: int = MAX_ROTATIONS, memory_bytes: int = 4 << 30) -> int:
    """How many input sets to rotate through: enough that together they touch ``target_bytes``
    (``bytes_per_call`` = what one call reads and writes), at least 1, at most ``limit``, and
    no more than fit in ``memory_bytes`` when each set allocates ``set_bytes``."""
    count = min(limit, -(-target_bytes // max(1, bytes_per_call)))
    if set_bytes > 0:
        count = min(count, memory_bytes // set_bytes)
    return max(1, count)


def host_time_per_call(fn: Callable[[], object], calls: int = 100,
                       sleep_cycles: int = 400_000_000) -> float:
    """Host µs per call of ``fn`` on CUDA: one untimed call, then ``calls`` calls queued behind a
    ``torch.cuda._sleep(sleep_cycles)`` (≈ 0.2 s on an H100 / H200), so no call waits for the
    GPU — valid while the calls launch fewer kernels than the launch queue holds (≈ 1000) and
    take less host time than the sleep."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    took = time.perf_counter() - start
    torch.cuda.synchronize()
    return took / calls * 1e6
