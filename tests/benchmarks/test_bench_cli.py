"""``valora bench serve``: argument errors, and an end-to-end in-process run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from valora.bench_cli import main
from valora.benchmarks.workload import BenchWorkload, generate, save_trace


@pytest.mark.parametrize("argv, message", [
    (["serve", "--policies", "fifo"], "unknown"),
    (["serve", "--popularity", "hot:1.5"], "popularity"),
    (["serve", "--rates", "0"], "positive"),
    (["serve", "--kind-mix", "1,2"], "kind-mix"),
    (["serve", "--url", "http://example.com:80", "--policies", "valora"], "loopback"),
    (["serve", "--url", "http://127.0.0.1:8000"], "exactly one"),
    (["serve", "--trace", "/nonexistent/trace.jsonl"], "no such file"),
    (["serve", "--lora-modules", "broken"], "NAME=PATH"),
])
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                         tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _engine_flags(model: Path) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--num-pages", "64", "--max-loras", "2",
            "--latency-target-s", "30"]


def test_end_to_end_in_process(tiny_model: Path, tiny_adapters: dict[str, str],
                               tmp_path: Path) -> None:
    modules = [f"{name}={path}" for name, path in tiny_adapters.items()]
    code = main(["serve", *_engine_flags(tiny_model), "--lora-modules", *modules,
                 "--num-requests", "4", "--rates", "50", "--popularity", "hot:0.7",
                 "--policies", "valora,unmerged-fcfs", "--kind-mix", "1,0,1",
                 "--num-frames", "2", "--warmup-requests", "1", "--out", str(tmp_path),
                 "--name", "e2e", "--no-plot"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["popularity"], r["rate_per_s"]) for r in rows] == [
        ("valora", "hot:0.7", 50.0), ("unmerged-fcfs", "hot:0.7", 50.0)]
    for row in rows:
        metrics = row["metrics"]
        assert metrics["num_finished"] == 4 and metrics["num_failed"] == 0
        assert 0 < metrics["mean_ttft_s"] <= metrics["mean_latency_s"]
        assert metrics["target_attainment"] is not None
        assert row["device"].startswith("CPU") and row["git_sha"]
        assert row["setup"]["num_adapters"] == 2
        assert row["modes"]["num_steps"] > 0 and row["modes"]["timeline"]
        # CPU: no graphs; every step eager. The policy's host time is recorded.
        assert row["modes"]["eager_steps"] > 0 and row["modes"]["graph_steps"] == 0
        assert row["modes"]["decision_seconds"] >= 0.0
        assert row["async_scheduling"] is False  # auto: off on the CPU
        expected = {r.request_id: r.output_tokens for r in generate(BenchWorkload(
            num_requests=4, rate_per_s=50.0, adapters=tuple(tiny_adapters),
            popularity="one-hot", kind_mix=(1.0, 0.0, 1.0), num_frames=2))}
        assert {r["request_id"]: r["num_output_tokens"] for r in row["requests"]} == expected
    assert rows[1]["modes"]["num_switches"] == 0  # unmerged-fcfs never merges
    assert rows[0]["modes"]["decision_seconds"] > 0.0  # valora decided every step
    summary = (tmp_path / "e2e.md").read_text()
    assert "| valora | hot:0.7 |" in summary and "| unmerged-fcfs | hot:0.7 |" in summary


def test_trace_replay(tiny_model: Path, tiny_adapters: dict[str, str], tmp_path: Path) -> None:
    requests = generate(BenchWorkload(num_requests=3, rate_per_s=100.0,
                                      adapters=tuple(tiny_adapters), seed=3))
    trace = save_trace(requests, tmp_path / "trace.jsonl")
    modules = [f"{name}={path}" for name, path in tiny_adapters.items()]
    code = main(["serve", *_engine_flags(tiny_model), "--lora-modules", *modules,
                 "--trace", str(trace), "--policies", "unmerged-fcfs", "--warmup-requests", "0",
                 "--out", str(tmp_path / "out"), "--name", "trace"])
    assert code == 0
    row = json.loads((tmp_path / "out" / "trace.jsonl").read_text())
    assert row["popularity"] == "trace" and row["metrics"]["num_finished"] == 3
    assert (tmp_path / "out" / "trace.png").stat().st_size > 0


def test_shared_engine_runs_every_policy_per_cell_in_alternating_order(
        tiny_model: Path, tiny_adapters: dict[str, str], tmp_path: Path) -> None:
    """``--shared-engine``: one engine; the policies take turns inside each cell (list order,
    then reversed), each run from the base weights with cold caches, so identical requests give
    identical outputs under every policy (mixed semantics are exact; greedy sampling)."""
    modules = [f"{name}={path}" for name, path in tiny_adapters.items()]
    code = main(["serve", *_engine_flags(tiny_model), "--lora-modules", *modules,
                 "--num-requests", "4", "--rates", "40", "80", "--popularity", "hot:0.7",
                 "--policies", "unmerged-fcfs,valora,dlora", "--kind-mix", "1,0,1",
                 "--num-frames", "2", "--warmup-requests", "1", "--shared-engine",
                 "--step-trace", "--out", str(tmp_path), "--name", "shared", "--no-plot"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "shared.jsonl").read_text().splitlines()]
    assert [(r["policy"], r["rate_per_s"]) for r in rows] == [
        ("unmerged-fcfs", 40.0), ("valora", 40.0), ("dlora", 40.0),
        ("dlora", 80.0), ("valora", 80.0), ("unmerged-fcfs", 80.0)]
    for row in rows:
        assert row["metrics"]["num_finished"] == 4 and row["metrics"]["num_failed"] == 0
        steps = row["steps"]  # --step-trace: the run's steps, in order, inside the run
        assert len(steps) == row["modes"]["num_steps"]
        assert all(0 <= s[0] <= row["wall_s"] and s[1] > 0 and s[3] >= 1 for s in steps)
        assert [s[0] for s in steps] == sorted(s[0] for s in steps)
        assert sum(s[4] for s in steps) >= sum(q["num_output_tokens"] for q in row["requests"])
        assert not any(s[2] for s in steps)  # CPU: no graphs
        assert {s[6] for s in steps} <= {"unmerged", "mixed", "merged"}  # the weights' mode
        assert row["modes"]["num_preemptions"] == 0  # recompute preemptions, per run
    by_policy = {r["policy"]: r for r in rows if r["rate_per_s"] == 40.0}
    assert by_policy["unmerged-fcfs"]["modes"]["num_switches"] == 0
    assert by_policy["unmerged-fcfs"]["modes"]["decision_seconds"] == 0.0  # no decisions made
    assert by_policy["valora"]["modes"]["decision_seconds"] > 0.0
    tokens = {p: {q["request_id"]: q["num_output_tokens"] for q in r["requests"]}
              for p, r in by_policy.items()}
    assert tokens["valora"] == tokens["unmerged-fcfs"] == tokens["dlora"]


def test_repeats_run_the_grid_again_on_the_engine_and_pool_the_summary(
        tiny_model: Path, tiny_adapters: dict[str, str], tmp_path: Path) -> None:
    """``--repeats 2``: the grid twice on one engine, turns alternating by cell and repeat,
    rows tagged with their repeat; the summary pools the repeats (valora's cost scales too)."""
    modules = [f"{name}={path}" for name, path in tiny_adapters.items()]
    code = main(["serve", *_engine_flags(tiny_model), "--lora-modules", *modules,
                 "--num-requests", "3", "--rates", "40", "--popularity", "hot:0.7",
                 "--policies", "unmerged-fcfs,valora", "--kind-mix", "1,0,0",
                 "--warmup-requests", "1", "--shared-engine", "--repeats", "2",
                 "--out", str(tmp_path), "--name", "rep", "--no-plot"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "rep.jsonl").read_text().splitlines()]
    assert [(r["repeat"], r["policy"]) for r in rows] == [
        (0, "unmerged-fcfs"), (0, "valora"), (1, "valora"), (1, "unmerged-fcfs")]
    assert all(r["metrics"]["num_finished"] == 3 for r in rows)
    scales = [r["modes"]["cost_scales"] for r in rows if r["policy"] == "valora"]
    assert all(s is not None and s["observed"][0] > 0 for s in scales)
    summary = (tmp_path / "rep.md").read_text()
    assert "each repeat: valora vs its best" in summary and "| hot:0.7 | 40 | 2 |" in summary
    with pytest.raises(SystemExit):  # repeats need the shared engine
        main(["serve", *_engine_flags(tiny_model), "--repeats", "2", "--out", str(tmp_path)])


def test_shared_engine_is_in_process_only(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--url", "http://127.0.0.1:8000", "--policies", "valora",
              "--shared-engine", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--shared-engine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--url", "http://127.0.0.1:8000", "--policies", "valora",
              "--step-trace", "--out", str(tmp_path)])


@pytest.mark.parametrize("shared", [False, True], ids=["engine-per-policy", "shared-engine"])
def test_every_run_starts_from_empty_caches(tiny_model: Path, tiny_adapters: dict[str, str],
                                            tmp_path: Path, shared: bool) -> None:
    """The runs of a sweep replay the same prompts and images: each starts from empty prefix
    and image caches, so a later run prefills exactly what the first did."""
    modules = [f"{name}={path}" for name, path in tiny_adapters.items()]
    code = main(["serve", *_engine_flags(tiny_model), "--lora-modules", *modules,
                 "--num-requests", "3", "--rates", "40", "80", "--popularity", "hot:0.7",
                 "--policies", "unmerged-fcfs", "--kind-mix", "1,0,0", "--warmup-requests", "1",
                 "--step-trace", "--out", str(tmp_path), "--name", "caches", "--no-plot",
                 *(["--shared-engine"] if shared else [])])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "caches.jsonl").read_text().splitlines()]
    computed = [sum(step[4] for step in row["steps"]) for row in rows]
    assert len(computed) == 2 and computed[0] == computed[1] > 0
