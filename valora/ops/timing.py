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
