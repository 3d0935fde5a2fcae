"""``GuardMiddleware``: the checks every HTTP request passes before any route sees it.

1. API keys: when ``settings.api_keys`` is non-empty, ``/v1/...`` routes need
   ``Authorization: Bearer <key>`` (401 otherwise); ``/health`` and ``/metrics`` stay open for
   probes and scrapers. Keys are compared in constant time.
2. Body size: a declared ``Content-Length`` over ``max_body_bytes`` is refused with 413 before
   reading; an undeclared (chunked) body is read up to the limit and refused once it passes it.
   The body read here is replayed to the app; later ``receive`` calls (disconnect detection) go
   to the server as usual.
3. Metrics: every response is counted by route and status (unknown paths as ``other``).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from valora.server.errors import HTTPError, error_for
from valora.server.metrics import Metrics
from valora.server.settings import ServerSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# An oversize body is still read (and dropped) up to this multiple of the limit before the 413,
# so that ordinary clients read the error instead of a reset connection; beyond it we stop reading.
_DRAIN_FACTOR = 4


class GuardMiddleware:
    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: Metrics,
                 known_routes: frozenset[str]) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.known_routes = known_routes
        self._keys = [key.encode() for key in settings.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        route = path if path in self.known_routes else "other"
        status_seen: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            body = refusal or await self._read_body(receive)
            if isinstance(body, HTTPError):
                if body.http_status == 413:
                    await _drain(receive, _DRAIN_FACTOR * self.settings.max_body_bytes)
                await _send_error(counting_send, body)
                return
            await self.app(scope, _replay(body, receive), counting_send)
        finally:
            self.metrics.observe_http(route, status_seen[0] if status_seen else 499)

    def _refusal(self, scope: Scope, path: str) -> HTTPError | None:
        headers = _headers(scope)
        if self._keys and path.startswith("/v1") and scope.get("method") != "OPTIONS":
            token = headers.get(b"authorization", b"")
            scheme, _, key = token.partition(b" ")
            valid = any(hmac.compare_digest(key.strip(), k) for k in self._keys)
            if scheme.lower() != b"bearer" or not valid:
                return HTTPError(401, "missing or invalid API key: send "
                                      "'Authorization: Bearer <key>'")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return HTTPError(400, "malformed Content-Length header")
            if int(declared) > self.settings.max_body_bytes:
                return _too_large(int(declared), self.settings.max_body_bytes)
        return None

    async def _read_body(self, receive: Receive) -> bytes | HTTPError:
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client left while sending
                return HTTPError(400, "the client disconnected while sending the body")
            chunk = bytes(message.get("body", b""))
            total += len(chunk)
            if total > limit:
                return _too_large(total, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _drain(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


def _too_large(size: int, limit: int) -> HTTPError:
    return HTTPError(413, f"request body of at least {size} bytes exceeds the limit of {limit} "
                          "bytes "
                          "(--max-body-bytes); send smaller or fewer images")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {bytes(k).lower(): bytes(v) for k, v in scope.get("headers", [])}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


async def _send_error(send: Send, error: HTTPError) -> None:
    status, body = error_for(error)
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
