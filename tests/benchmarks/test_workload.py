"""Benchmark workloads: determinism, kinds, popularity skew and trace round trips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from valora.benchmarks import payload
from valora.benchmarks.workload import (
    OUTPUT_TOKENS,
    BenchWorkload,
    generate,
    load_trace,
    save_trace,
)
from valora.errors import InvalidRequestError

ADAPTERS = tuple(f"ad{i}" for i in range(16))


def test_same_seed_same_workload_and_payloads() -> None:
    spec = BenchWorkload(num_requests=50, rate_per_s=3.0, adapters=ADAPTERS, arrival="gamma",
                         cv=3.0, seed=7)
    first, second = generate(spec), generate(spec)
    assert first == second
    assert payload.question_text(first[3], 7) == payload.question_text(second[3], 7)
    assert payload.images(first[3], 7)[0].tobytes() == payload.images(second[3], 7)[0].tobytes()
    other = generate(BenchWorkload(num_requests=50, rate_per_s=3.0, adapters=ADAPTERS,
                                   arrival="gamma", cv=3.0, seed=8))
    assert [r.arrival_s for r in other] != [r.arrival_s for r in first]


def test_kinds_shape_requests() -> None:
    requests = generate(BenchWorkload(num_requests=200, rate_per_s=5.0, adapters=ADAPTERS,
                                      kind_mix=(1.0, 1.0, 1.0), num_frames=3))
    kinds = Counter(r.kind for r in requests)
    assert set(kinds) == {"short", "long", "frames"}
    for r in requests:
        low, high = OUTPUT_TOKENS[r.kind]
        assert low <= r.output_tokens <= high
        assert r.num_images == (3 if r.kind == "frames" else 1)
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals)


def test_one_hot_popularity_skews_traffic() -> None:
    requests = generate(BenchWorkload(num_requests=400, rate_per_s=5.0, adapters=ADAPTERS,
                                      popularity="one-hot", hot_fraction=0.8, seed=1))
    share = sum(r.adapter == ADAPTERS[0] for r in requests) / len(requests)
    assert 0.72 < share < 0.88


def test_trace_round_trip_and_errors(tmp_path: Path) -> None:
    requests = generate(BenchWorkload(num_requests=10, rate_per_s=2.0, adapters=ADAPTERS))
    path = save_trace(requests, tmp_path / "trace.jsonl")
    loaded = load_trace(path, ADAPTERS)
    start = requests[0].arrival_s
    assert [r.arrival_s for r in loaded] == pytest.approx([r.arrival_s - start for r in requests])
    assert [(r.adapter, r.kind, r.output_tokens) for r in loaded] == [
        (r.adapter, r.kind, r.output_tokens) for r in requests]
    with pytest.raises(InvalidRequestError, match="not served"):
        load_trace(path, ("other",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0.0}\n')
    with pytest.raises(InvalidRequestError, match=r"bad\.jsonl:1"):
        load_trace(bad)
