"""``ServerContext``: what every handler shares (engine, settings, metrics), and the one path by
which a handler starts a generation and consumes its outputs.

Invariant: every request admitted through ``start`` is counted once in ``Metrics.finished`` — as
``stop``/``length`` when it completes, ``error`` when the engine fails it, ``abort`` when its
consumer leaves early — and is aborted in the engine unless it finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from valora.engine.async_engine import AsyncEngine, RequestStream
from valora.engine.inputs import GenerateRequest
from valora.errors import AdapterNotFoundError
from valora.outputs import RequestOutput
from valora.server.errors import HTTPError
from valora.server.metrics import Metrics
from valora.server.settings import ServerSettings
from valora.server.translate import ModelNotFoundError, model_not_found

if TYPE_CHECKING:
    from starlette.requests import Request

T = TypeVar("T")

CLIENT_CLOSED_STATUS = 499  # nginx's convention for "client closed the request"


class Generation:
    """One admitted request as a handler consumes it: iterate ``outputs()`` or await ``final()``,
    and always ``close()`` (idempotent) when done with it."""

    def __init__(self, stream: RequestStream, adapter: str | None, metrics: Metrics) -> None:
        self.stream = stream
        self.adapter = adapter
        self._metrics = metrics
        self._last: RequestOutput | None = None
        self._recorded = False

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yield every output up to the finished one; leaving early aborts the request."""
        try:
            async for output in self.stream:
                self._last = output
                if output.finished:
                    reason = output.outputs[0].finish_reason if output.outputs else None
                    self._record(reason or "stop")
                yield output
        except Exception:
            self._record("error")
            raise
        finally:
            self.close()

    async def final(self) -> RequestOutput:
        """Run the request to its end and return its finished output."""
        last: RequestOutput | None = None
        async for output in self.outputs():
            last = output
        if last is None or not last.finished:
            raise AssertionError("a request stream ended without a finished output")
        return last

    def close(self) -> None:
        self.stream.close()
        self._record("abort")

    def _record(self, reason: str) -> None:
        if not self._recorded:
            self._recorded = True
            self._metrics.observe_finished(self._last, reason, self.adapter)


@dataclass
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: Metrics

    async def start(self, spec: GenerateRequest, model: str) -> Generation:
        """Admit ``spec``; an unknown adapter is reported as an unknown ``model`` (404)."""
        try:
            stream = await self.engine.add_request(
                spec, max_prompt_tokens=self.settings.max_prompt_tokens)
        except AdapterNotFoundError as exc:
            if isinstance(exc, ModelNotFoundError) or spec.adapter is None:
                raise
            raise model_not_found(model, self.settings.served_model_name) from None
        self.metrics.observe_started(spec.adapter)
        return Generation(stream, spec.adapter, self.metrics)


async def unless_disconnected(request: Request, work: Awaitable[T], poll_s: float) -> T:
    """Await ``work``; if the client disconnects first, cancel it (which aborts its generation)
    and raise a 499 ``HTTPError``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request, poll_s))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise HTTPError(CLIENT_CLOSED_STATUS,
                    "the client closed the connection; the request was aborted")


async def _wait_for_disconnect(request: Request, poll_s: float) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)
