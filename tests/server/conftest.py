"""Fixtures for the HTTP server tests: a tiny LLaVA, adapters, images, and two kinds of server.

- ``served``: the ``valora serve`` entry point (``python -m valora.server.cli``) started as a real
  subprocess (uvicorn, loopback only), shared by the whole session; tests see it only through
  HTTP (``/metrics`` for engine state).
- ``start_thread_server``: uvicorn in a thread of the test process around an ``AsyncEngine`` the
  test holds, for fault injection and direct checks of pages and pins.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from server_helpers import (
    API_KEY,
    BASE_NAME,
    ENGINE_OPTIONS,
    MAX_BODY_BYTES,
    MAX_PROMPT_TOKENS,
    STARTUP_DEADLINE_S,
    Served,
    ThreadServer,
    free_port,
    png_bytes,
    wait_until,
)

from valora import LLM
from valora.config import EngineConfig
from valora.engine.async_engine import AsyncEngine
from valora.server.app import create_app
from valora.server.settings import ServerSettings
from valora.testing.checkpoints import build_tiny_adapter, build_tiny_llava


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("server_tiny_llava"))


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """r4 (all modules), r8 (attention only), r16 (all modules) and 'spare' (for load tests)."""
    root = tmp_path_factory.mktemp("server_adapters")
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    return {
        "r4": build_tiny_adapter(tiny_model, root / "r4", 4, seed=11, std=0.2),
        "r8": build_tiny_adapter(tiny_model, root / "r8", 8, targets=attention, seed=12, std=0.2),
        "r16": build_tiny_adapter(tiny_model, root / "r16", 16, seed=13, std=0.2),
        "spare": build_tiny_adapter(tiny_model, root / "spare", 8, seed=14, std=0.2),
    }


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("allowed_media")
    (directory / "ok.png").write_bytes(png_bytes(5))
    return directory


@pytest.fixture(scope="session")
def reference_llm(tiny_model: Path, tiny_adapters: dict[str, Path]) -> LLM:
    """The same model in-process, for 'the same request run alone' reference answers."""
    adapters = {k: v for k, v in tiny_adapters.items() if k != "spare"}
    return LLM(model=str(tiny_model), adapters=adapters, **ENGINE_OPTIONS)


@pytest.fixture(scope="session")
def served(tiny_model: Path, tiny_adapters: dict[str, Path], media_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``python -m valora.cli serve ...`` on a free loopback port, until the session ends."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server_log") / "serve.log"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_OPTIONS.items()]
    modules = [f"{name}={path}" for name, path in tiny_adapters.items() if name != "spare"]
    command = [sys.executable, "-m", "valora.server.cli", "--model", str(tiny_model),
               "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--api-key", API_KEY, "--enable-lora-loading", "--allowed-local-media-path",
               str(media_dir), "--max-body-bytes", str(MAX_BODY_BYTES), "--max-prompt-tokens",
               str(MAX_PROMPT_TOKENS), "--lora-modules", *modules, *flags]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"valora serve exited with {process.returncode}:\n"
                                 f"{log_path.read_text()[-4000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, STARTUP_DEADLINE_S, "valora serve to become healthy")
        yield Served(url, API_KEY, tiny_model, tiny_adapters, media_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture
def start_thread_server(tiny_model: Path) -> Iterator[Callable[..., ThreadServer]]:
    """Factory: ``start(settings=..., **engine_options)`` → a running in-thread server."""
    started: list[ThreadServer] = []

    def start(settings: ServerSettings | None = None, adapters: dict[str, Path] | None = None,
              **options: Any) -> ThreadServer:
        engine = AsyncEngine.from_config(
            EngineConfig.create(model=str(tiny_model), **{**ENGINE_OPTIONS, **options}))
        for name, path in (adapters or {}).items():
            engine.submit(lambda e, n=name, p=path: e.parts.adapters.register(n, str(p))).result()
        app = create_app(engine, settings or ServerSettings(served_model_name=BASE_NAME))
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        handle = ThreadServer(f"http://127.0.0.1:{port}", engine, server, thread)
        started.append(handle)
        wait_until(lambda: server.started, 60.0, "uvicorn to start")
        return handle

    yield start
    for handle in started:
        handle.stop()
