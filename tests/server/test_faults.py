"""Faults: clients that disconnect, an adapter that fails to load, exceptions inside engine steps.

Each runs against uvicorn in a thread of the test process so that the test can inject the fault
and read the engine's pages and pins directly. Only the affected requests may fail, every page and
pin must come back, and ``/health`` must say whether the engine still serves.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from server_helpers import BASE_NAME, ThreadServer, wait_until

from valora.engine.engine import LLMEngine
from valora.server.settings import ServerSettings
from valora.testing.checkpoints import build_tiny_adapter

LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0.0}
SETTINGS = ServerSettings(served_model_name=BASE_NAME, disconnect_poll_s=0.02)


def chat(text: str, model: str = BASE_NAME, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 3,
            "temperature": 0.0, **extra}


def engine_state(server: ThreadServer) -> dict[str, Any]:
    def read(engine: LLMEngine) -> dict[str, Any]:
        pool = engine.parts.kv_manager.pool
        return {"busy": engine.has_unfinished_requests(), "used_pages": pool.num_used_pages,
                "pins": {a.name: a.pin_count for a in engine.parts.adapters.list_adapters()},
                "waiting": engine.parts.scheduler.num_waiting,
                "running": engine.parts.scheduler.num_running}
    return server.engine.submit(read).result(timeout=30)


def wait_idle(server: ThreadServer) -> dict[str, Any]:
    wait_until(lambda: not engine_state(server)["busy"], 60.0, "the engine to go idle")
    state = engine_state(server)
    assert state["used_pages"] == 0 and all(p == 0 for p in state["pins"].values()), state
    return state


def finished_counts(server: ThreadServer) -> dict[tuple[str, str], int]:
    return dict(server.server.config.app.state.ctx.metrics.finished)  # type: ignore[attr-defined]


def test_disconnect_mid_stream_aborts_and_frees_pages(
        start_thread_server: Callable[..., ThreadServer]) -> None:
    server = start_thread_server(settings=SETTINGS)
    with httpx.Client(base_url=server.url, timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", json=chat("go on", stream=True, **LONG)) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any('"content"' in line for line in received)
        assert engine_state(server)["used_pages"] > 0
    wait_idle(server)
    assert finished_counts(server) == {("abort", "__base__"): 1}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=chat("after"), timeout=60)
    assert response.status_code == 200


def test_disconnect_while_waiting_for_a_whole_response(
        start_thread_server: Callable[..., ThreadServer]) -> None:
    server = start_thread_server(settings=SETTINGS)
    body = json.dumps(chat("long answer", **LONG)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: engine_state(server)["running"] == 1, 30.0, "the request to run")
    wait_idle(server)
    assert finished_counts(server) == {("abort", "__base__"): 1}


def test_exception_in_one_step_fails_only_that_step(
        start_thread_server: Callable[..., ThreadServer]) -> None:
    server = start_thread_server(settings=SETTINGS)

    def install(engine: LLMEngine) -> None:
        original = engine.parts.execute

        def faulty(scheduled: Any, *rest: Any) -> Any:
            if any("FAULT" in (item.request.prompt or "") for item in scheduled.scheduled):
                raise RuntimeError("injected fault")
            return original(scheduled, *rest)
        engine.parts.execute = faulty  # type: ignore[method-assign]
    server.engine.submit(install).result()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = http.post("/v1/chat/completions", json=chat("before"))
        failed = http.post("/v1/chat/completions", json=chat("FAULT please"))
        with http.stream("POST", "/v1/chat/completions", json=chat("FAULT stream", stream=True)) as r:
            events = [line for line in r.iter_lines() if line]
        after = http.post("/v1/chat/completions", json=chat("before"))
        health = http.get("/health")
    assert before.status_code == 200 and after.status_code == 200
    assert after.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]
    assert failed.status_code == 500
    assert "injected fault" in failed.json()["error"]["message"]
    assert "injected fault" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert health.status_code == 200 and health.json()["status"] == "ok"
    wait_idle(server)


def test_repeated_step_failures_kill_the_engine_and_health_says_so(
        start_thread_server: Callable[..., ThreadServer]) -> None:
    server = start_thread_server(settings=SETTINGS, max_num_seqs=1)

    def install(engine: LLMEngine) -> None:
        def always_fails(scheduled: Any) -> Any:
            raise RuntimeError("device lost")
        engine.parts.execute = always_fails  # type: ignore[method-assign]
    server.engine.submit(install).result()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return list(await asyncio.gather(*(http.post("/v1/chat/completions", json=chat(f"r{i}"))
                                               for i in range(5))))
    statuses = sorted(r.status_code for r in asyncio.run(burst()))
    # max_num_seqs=1: each step fails one request; the third failure in a row kills the engine and
    # the two requests still queued fail as "engine dead".
    assert statuses == [500, 500, 500, 503, 503]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and "consecutive step failures" in health.json()["error"]["message"]
    late = httpx.post(f"{server.url}/v1/chat/completions", json=chat("late"))
    assert late.status_code == 503 and late.json()["error"]["type"] == "engine_dead"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "valora_engine_healthy 0" in metrics


def test_adapter_that_fails_to_load_fails_only_its_requests(
        start_thread_server: Callable[..., ThreadServer], tiny_model: Path,
        tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    """One slot and one host-cache entry: ``fragile`` is queued behind a running ``r8`` request,
    evicted from host memory by ``r16``, then changed on disk; when the slot frees, loading it fails
    and only its request fails (a 400 naming the adapter), while ``r8`` and ``r16`` complete."""
    fragile = tmp_path / "fragile"
    shutil.copytree(tiny_adapters["r4"], fragile)
    server = start_thread_server(settings=SETTINGS, max_loras=1, max_cpu_loras=1, adapters={
        "fragile": fragile, "r8": tiny_adapters["r8"], "r16": tiny_adapters["r16"]})

    async def scenario() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            first = asyncio.ensure_future(http.post("/v1/chat/completions",
                                                    json=chat("hold the slot", "r8", max_tokens=200,
                                                              ignore_eos=True)))
            await asyncio.to_thread(wait_until, lambda: engine_state(server)["pins"]["r8"] == 1)
            queued = [asyncio.ensure_future(http.post("/v1/chat/completions", json=chat("hi", name)))
                      for name in ("fragile", "r16")]
            await asyncio.to_thread(wait_until, lambda: engine_state(server)["waiting"] == 2)
            build_tiny_adapter(tiny_model, fragile, 4, seed=999, std=0.2)  # new weights on disk
            responses = await asyncio.gather(first, *queued)
        return dict(zip(("r8", "fragile", "r16"), responses, strict=True))
    responses = asyncio.run(scenario())
    assert responses["r8"].status_code == 200 and responses["r16"].status_code == 200
    assert responses["fragile"].status_code == 400, responses["fragile"].text
    assert "changed on disk" in responses["fragile"].json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    wait_idle(server)


def test_load_routes_are_off_by_default(start_thread_server: Callable[..., ThreadServer],
                                        tiny_adapters: dict[str, Path]) -> None:
    server = start_thread_server()
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "x",
                                                   "lora_path": str(tiny_adapters["r4"])}),
                        ("/v1/unload_lora_adapter", {"lora_name": "x"})):
        response = httpx.post(f"{server.url}{route}", json=body)
        assert response.status_code == 403
        assert "--enable-lora-loading" in response.json()["error"]["message"]
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [BASE_NAME]
    cors = httpx.options(f"{server.url}/v1/models", headers={"Origin": "http://evil.example",
                                                            "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in cors.headers
