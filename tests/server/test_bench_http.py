"""``valora bench serve --url``: the serving benchmark driving a real ``valora serve`` process
over loopback HTTP (streamed chat completions, adapters by name, image and multi-frame
requests), with the server's API key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_helpers import Served, free_port

from valora.bench_cli import main


def test_bench_serve_drives_a_running_server(served: Served, tmp_path: Path) -> None:
    names = [name for name in served.adapters if name != "spare"]
    modules = [f"{name}={served.adapters[name]}" for name in names]
    code = main(["serve", "--url", served.url, "--api-key", served.api_key,
                 "--model", str(served.model_dir), "--lora-modules", *modules,
                 "--num-requests", "6", "--rates", "30", "--popularity", "uniform",
                 "--policies", "unmerged-fcfs", "--kind-mix", "1,1,1", "--num-frames", "2",
                 "--out", str(tmp_path), "--name", "http", "--no-plot"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "http.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["target"] == served.url and row["modes"] is None
    assert row["metrics"]["num_finished"] == 6 and row["metrics"]["num_failed"] == 0
    kinds = {request["kind"] for request in row["requests"]}
    assert kinds <= {"short", "long", "frames"} and len(kinds) >= 2
    for request in row["requests"]:
        assert request["error"] is None, request
        assert request["adapter"] in names
        assert request["num_output_tokens"] > 0
        assert request["arrival_s"] <= request["first_token_s"] <= request["finish_s"]
    assert served.api_key not in (tmp_path / "http.jsonl").read_text()
    assert "| unmerged-fcfs |" in (tmp_path / "http.md").read_text()


def test_bench_serve_without_the_key_says_so(served: Served, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A server with ``--api-key`` refuses a benchmark without it: a usage error naming the
    flag (exit status 2), not a traceback; a port nobody listens on: the same, naming it."""
    monkeypatch.delenv("VALORA_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    names = [name for name in served.adapters if name != "spare"]
    flags = ["--model", str(served.model_dir),
             "--lora-modules", *[f"{n}={served.adapters[n]}" for n in names],
             "--num-requests", "2", "--rates", "30", "--popularity", "uniform",
             "--policies", "unmerged-fcfs", "--out", str(tmp_path), "--no-plot"]
    with pytest.raises(SystemExit) as info:
        main(["serve", "--url", served.url, *flags])
    assert info.value.code == 2 and "--api-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["serve", "--url", f"http://127.0.0.1:{free_port()}", *flags])
    assert info.value.code == 2 and "no valora server answers" in capsys.readouterr().err
