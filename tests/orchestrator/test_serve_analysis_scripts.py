"""The serving-analysis scripts of ``bench/orchestrator`` run on a grid file and say what the
rows hold: a step-trace summary line, and a replay whose table names every cell."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from valora.orchestrator.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "orchestrator" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(policy: str, latency_s: float) -> dict[str, object]:
    requests = [{"request_id": f"r{i}", "adapter": f"adapter-{i % 3}",
                 "kind": "frames" if i == 0 else "short", "arrival_s": 0.2 * i,
                 "first_token_s": 0.2 * i + 0.05, "finish_s": 0.2 * i + latency_s,
                 "num_output_tokens": 5, "error": None} for i in range(6)]
    return {"policy": policy, "popularity": "zipf:1", "rate_per_s": 5.0, "capacity_per_s": 10.0,
            "wall_s": 2.0, "requests": requests,
            "metrics": {"mean_latency_s": latency_s},
            "modes": {"num_switches": 1, "switch_seconds": 0.01},
            "steps": [[0.0, 0.05, False, 1, 2353, 1], [0.06, 0.006, True, 1, 1, 1],
                      [0.07, 0.03, False, 1, 622, 0]]}


def test_step_trace_summary_counts_eager_and_graph_steps() -> None:
    line = _script("step_trace_summary").summarise(_row("valora", 0.3))
    assert "eager  0.08 s /   2 steps of  1488 tok" in line
    assert "median  50.0 ms LoRA,  30.0 ms none" in line
    assert "graphs  0.01 s /   1" in line and "switches  1" in line


def test_replay_runs_every_policy_on_the_run_requests(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    module = _script("replay_serve_runs")
    requests = module.requests_of(_row("valora", 0.3), 45, 4)
    assert [r.prompt_tokens for r in requests[:2]] == [4 * 577 + 45, 577 + 45]
    grid = tmp_path / "grid.jsonl"
    grid.write_text("".join(json.dumps(_row(p, v)) + "\n" for p, v in
                            (("valora", 0.3), ("unmerged-fcfs", 0.4), ("dlora", 0.5))))
    profile = tmp_path / "profile.json"
    CostModel("dev", {"const": 5e-3, "num_tokens": 2e-5, "eager": 1e-2,
                      "eager_lora_launches": 1e-2, "lora_launches": 1e-3},
              {"const": 1e-2, "bytes": 1e-12}, graph_max_rows=64).save(profile)
    out = tmp_path / "replayed.jsonl"
    assert module.main([str(grid), "--profile", str(profile), "--entry", "dev",
                        "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[2].startswith("| grid.jsonl | zipf:1 | 5 |")
    assert table[2].endswith("| -25.0% |")  # the GPU run's valora vs its best (0.3 vs 0.4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["policy"] for r in rows) == ["dlora", "merged-only", "unmerged-fcfs",
                                                  "valora"]
