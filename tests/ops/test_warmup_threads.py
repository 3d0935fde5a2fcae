"""The LoRA warm-up's worker threads (``valora.ops.warmup``): how many, that launches run on them
under inference mode, and that a failure there reruns everything in order on the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from valora.ops import warmup
from valora.ops.warmup import warm_up_threads

CPU = torch.device("cpu")


def test_thread_count_follows_the_device_and_the_request() -> None:
    cuda = torch.device("cuda", 0)
    assert warm_up_threads(CPU) == warm_up_threads(CPU, 8) == 1  # the interpreter: in order
    assert warm_up_threads(cuda, 3) == 3
    assert 1 <= warm_up_threads(cuda) <= warmup.MAX_THREADS


def test_launches_run_on_worker_threads_under_inference_mode() -> None:
    seen: list[tuple[str, bool]] = []

    def launch() -> None:
        seen.append((threading.current_thread().name, torch.is_inference_mode_enabled()))

    assert warmup.run_launches([launch] * 6, CPU, 2) == 2
    assert len(seen) == 6 and all(inference for _, inference in seen)
    assert {name for name, _ in seen} <= {f"valora-warmup_{i}" for i in range(2)}
    seen.clear()
    assert warmup.run_launches([launch] * 3, CPU, 1) == 1  # in order, on this thread
    assert {name for name, _ in seen} == {threading.current_thread().name}


def test_a_failure_on_the_workers_reruns_everything_in_order(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    main_thread = threading.current_thread().name

    def flaky() -> None:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name != main_thread:
            raise RuntimeError("compile failed on a worker")

    def fine() -> None:
        calls.append(threading.current_thread().name)

    with caplog.at_level("WARNING", logger="valora.ops.warmup"):
        assert warmup.run_launches([fine, flaky, fine], CPU, 2) == 1
    assert "compiling in order" in caplog.text
    assert calls[-3:] == [main_thread] * 3  # all three again, in order, here

