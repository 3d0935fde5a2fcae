"""Helpers shared by the server tests (constants, images, metrics parsing, bounded waits)."""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

from valora.engine.async_engine import AsyncEngine

API_KEY = "sk-valora-test"
BASE_NAME = "tiny"
ENGINE_OPTIONS: dict[str, Any] = {
    "dtype": "float32", "device": "cpu", "num_pages": 512, "page_size": 8, "max_loras": 2,
    "max_cpu_loras": 4, "max_lora_rank": 16, "max_image_pixels": 100_000, "max_num_seqs": 64,
}
MAX_BODY_BYTES = 1_000_000
MAX_PROMPT_TOKENS = 200
STARTUP_DEADLINE_S = 180.0


def png_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(payload: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], deadline_s: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until it holds (a bounded wait, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what or condition}")
        time.sleep(0.05)


def parse_metrics(text: str) -> dict[str, float]:
    """``'name{labels}' -> value`` for every sample line of a Prometheus text body."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_values(samples: dict[str, float], name: str) -> list[float]:
    return [v for k, v in samples.items() if re.fullmatch(rf"{name}(\{{.*\}})?", k)]


@dataclass
class Served:
    url: str
    api_key: str
    model_dir: Path
    adapters: dict[str, Path]
    media_dir: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120.0,
                            headers={"Authorization": f"Bearer {self.api_key}"}, **kwargs)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30.0).text)


@dataclass
class ThreadServer:
    url: str
    engine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown()
