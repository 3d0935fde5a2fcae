"""Drive a running valora (OpenAI-compatible) server over loopback HTTP, open loop.

Every request is a streamed ``POST /v1/chat/completions`` sent at its arrival offset (asyncio +
httpx); the first chunk carrying content marks the first token, ``[DONE]`` the finish. The
``model`` field names the adapter (or the server's base model), ``ignore_eos`` and ``max_tokens``
force the output length, ``stream_options.include_usage`` reports the tokens produced. Mode
timelines are not visible from outside the server, so HTTP runs report none.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from valora.benchmarks import payload
from valora.benchmarks.inprocess import RunResult
from valora.benchmarks.metrics import RequestTiming
from valora.benchmarks.workload import BenchRequest
from valora.errors import InvalidRequestError, ValoraError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_loopback(url: str) -> str:
    """The URL without a trailing slash; refuses anything but http on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
        raise InvalidRequestError(
            f"--url must be http://127.0.0.1:PORT (loopback only, port given), got {url!r}")
    return url.rstrip("/")


async def _base_model(client: httpx.AsyncClient) -> str:
    """The server's base model id; a clear error when the server refuses or is not there."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise ValoraError(
            f"no valora server answers at {client.base_url}: {exc}") from exc
    if response.status_code == 401:
        raise InvalidRequestError(
            f"the server at {client.base_url} wants an API key: pass --api-key (or set "
            "VALORA_API_KEY)")
    if response.status_code != 200:
        raise ValoraError(
            f"GET /v1/models at {client.base_url} answered {response.status_code}: "
            f"{response.text[:200]}")
    return str(response.json()["data"][0]["id"])


async def _one(client: httpx.AsyncClient, request: BenchRequest, body: dict[str, Any],
               timing: RequestTiming, start: float) -> None:
    await asyncio.sleep(max(0.0, request.arrival_s - (time.monotonic() - start)))
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                timing.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    timing.finish_s = time.monotonic() - start
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    timing.num_output_tokens = int(chunk["usage"]["completion_tokens"])
                choices = chunk.get("choices") or []
                if timing.first_token_s is None and any(
                        (c.get("delta") or {}).get("content") for c in choices):
                    timing.first_token_s = time.monotonic() - start
    except httpx.HTTPError as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    if timing.error is None and timing.finish_s is None:
        timing.error = "stream ended without [DONE]"


async def _run(url: str, requests: Sequence[BenchRequest], seed: int,
               timeout_s: float, api_key: str | None) -> RunResult:
    timings = [RequestTiming(r.request_id, r.adapter, r.kind, r.arrival_s, r.latency_target_s)
               for r in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits,
                                 headers=headers) as client:
        base = await _base_model(client)
        bodies = []
        for r in requests:
            body: dict[str, Any] = {
                "model": r.adapter or base, "messages": payload.openai_messages(r, seed),
                "max_tokens": r.output_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }
            if r.latency_target_s is not None:
                body["latency_target_s"] = r.latency_target_s
            bodies.append(body)
        start = time.monotonic()
        await asyncio.gather(*(_one(client, r, b, t, start)
                               for r, b, t in zip(requests, bodies, timings, strict=True)))
        return RunResult(timings, None, time.monotonic() - start)


def run_http(url: str, requests: Sequence[BenchRequest], *, seed: int = 0,
             timeout_s: float = 600.0, api_key: str | None = None) -> RunResult:
    """Replay ``requests`` against the server at ``url`` (loopback) and return their timings;
    ``api_key`` is sent as a bearer token (a server started with ``--api-key``)."""
    return asyncio.run(_run(check_loopback(url), requests, seed, timeout_s, api_key))
