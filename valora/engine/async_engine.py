"""``AsyncEngine``: the synchronous ``LLMEngine`` driven by one background thread, for asyncio
callers.

The engine is not thread-safe, so exactly one thread (the *engine thread*) ever touches it. Every
other caller submits a *command* (a function of the engine) to a queue and awaits its result. The
engine thread loops: run every queued command, then, while any request is unfinished, ``step()``
once and route each ``RequestOutput`` to the asyncio queue of the request's stream.

Invariants:

- A request is registered as a stream in the same command that adds it to the engine, so no output
  of it can be routed before its stream exists.
- A caller that stops iterating ``generate`` before the request finished (client gone, task
  cancelled) aborts the request, which frees its pages and adapter pin.
- A request the engine fails raises, from its stream, the typed error the engine recorded (see
  ``failure_error``); the other requests go on.
- When the engine dies (``LLMEngine.dead_reason`` set, or ``step`` itself raised
  ``max_consecutive_step_failures`` times in a row), every in-flight request fails with
  ``EngineDeadError``, ``health()`` reports it and new requests are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from valora import errors
from valora.config import EngineConfig
from valora.engine.engine import LLMEngine
from valora.engine.inputs import GenerateRequest
from valora.errors import EngineDeadError, InvalidRequestError, PromptTooLongError, ValoraError
from valora.logger import get_logger
from valora.outputs import RequestOutput

logger = get_logger(__name__)

T = TypeVar("T")
_Command = tuple[Callable[[LLMEngine], Any], Future[Any]]

# How long the idle engine thread waits for a command before re-checking its stop flag, and how long
# it pauses when requests are queued but none could be scheduled (adapter slots all pinned).
_IDLE_WAIT_S = 0.2
_STALL_WAIT_S = 0.002


class RequestFailedError(ValoraError):
    """The engine failed a request while running it (an exception inside its step)."""

    http_status = 500
    error_type = "internal_error"


@dataclass(frozen=True)
class EngineHealth:
    """``healthy`` is False once the engine is dead or its thread stopped; ``reason`` says why."""

    healthy: bool
    reason: str | None
    num_in_flight: int


def failure_error(request_id: str, message: str | None) -> ValoraError:
    """The typed error of a request the engine failed. The engine records a ``ValoraError`` as
    ``"<ClassName>: <message>"``; that class is raised again (so an adapter that could not be
    loaded stays a 400), anything else becomes ``RequestFailedError`` (500)."""
    name, sep, rest = (message or "").partition(": ")
    error_class = getattr(errors, name, None) if sep else None
    if (
        isinstance(error_class, type)
        and issubclass(error_class, ValoraError)
        and error_class is not ValoraError
    ):
        return error_class(rest)
    return RequestFailedError(f"request {request_id} failed: {message}")


class _Stream:
    """Where the engine thread delivers one request's outputs (or the error that ended it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        # RuntimeError: the caller's loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class RequestStream:
    """Async iterator over one request's outputs, ending after the finished one.

    Raises ``RequestFailedError`` when the engine failed the request and ``EngineDeadError`` when
    the engine died. ``close()`` before the end aborts the request (idempotent, never blocks)."""

    def __init__(self, owner: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.request_id = request_id
        self._owner = owner
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            failed = bool(item.outputs) and item.outputs[0].finish_reason == "error"
            if item.error is not None or failed:
                raise failure_error(self.request_id, item.error)
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


class AsyncEngine:
    """Asyncio front of one ``LLMEngine``; see the module docstring for the threading contract."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._dead_reason: str | None = None
        self._unexplained_failures = 0
        self._wakeup = threading.Event()
        engine.output_sink = self._deliver  # async output processing: outputs leave mid-step
        self._thread = threading.Thread(target=self._run, name="valora-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (read-only use from any thread: decoding single tokens)."""
        return self.engine.parts.tokenizer

    # ----- commands -----------------------------------------------------------------------
    def submit(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Queue ``fn(engine)`` to run on the engine thread; the future holds its result."""
        future: Future[T] = Future()
        if not self._thread.is_alive():
            future.set_exception(self._stopped_error())
            return future
        self._commands.put((fn, future))
        self._wakeup.set()
        return future

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread and return its result (exceptions propagate)."""
        return await asyncio.wrap_future(self.submit(fn))

    # ----- requests -----------------------------------------------------------------------
    async def add_request(
        self, spec: GenerateRequest, *, max_prompt_tokens: int | None = None
    ) -> RequestStream:
        """Add ``spec`` to the engine and return the stream of its outputs.

        Raises the engine's typed error if the request is rejected (nothing is queued then), or
        ``PromptTooLongError`` if its prompt (image tokens included) exceeds ``max_prompt_tokens``.
        If the caller is cancelled while this waits, the request is aborted."""
        if spec.request_id is None:
            spec = replace(spec, request_id=uuid.uuid4().hex)
        request_id = str(spec.request_id)
        stream = _Stream(asyncio.get_running_loop())
        try:
            await self.call(lambda engine: self._add(engine, spec, stream, max_prompt_tokens))
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return RequestStream(self, request_id, stream)

    async def generate(
        self, spec: GenerateRequest, *, max_prompt_tokens: int | None = None
    ) -> AsyncIterator[RequestOutput]:
        """``add_request`` then yield every output up to the finished one; leaving early aborts."""
        stream = await self.add_request(spec, max_prompt_tokens=max_prompt_tokens)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (safe from any thread, never blocks; unknown ids are ignored)."""

        def run(engine: LLMEngine) -> None:
            self._streams.pop(request_id, None)
            engine.abort_request(request_id)

        if self._thread.is_alive():
            self._commands.put((run, Future()))
            self._wakeup.set()

    def _add(
        self,
        engine: LLMEngine,
        spec: GenerateRequest,
        stream: _Stream,
        max_prompt_tokens: int | None,
    ) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead_reason}")
        request = engine.add_request(spec)
        if max_prompt_tokens is not None and request.num_prompt_tokens > max_prompt_tokens:
            engine.abort_request(request.request_id)
            raise PromptTooLongError(
                f"the prompt is {request.num_prompt_tokens} tokens (image tokens included); this "
                f"server accepts at most {max_prompt_tokens} (--max-prompt-tokens)"
            )
        self._streams[request.request_id] = stream

    # ----- adapters -----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        """Register a PEFT adapter directory under ``name`` (validated now; raises typed errors)."""
        await self.call(lambda engine: engine.parts.adapters.register(name, path))

    async def unload_adapter(self, name: str) -> None:
        """Unregister ``name``; refused (``InvalidRequestError``) while unfinished requests use it,
        queued ones included (they could never be scheduled once it is gone)."""

        def run(engine: LLMEngine) -> None:
            users = sum(
                1 for r in engine.requests.values() if r.adapter_name == name and not r.is_finished
            )
            if users:
                raise InvalidRequestError(
                    f"adapter {name!r} is used by {users} unfinished "
                    "request(s); unload it after they finish"
                )
            engine.parts.adapters.unregister(name)
            engine.parts.drop_adapter(name)

        await self.call(run)

    async def list_adapters(self) -> list[Any]:
        return await self.call(lambda engine: list(engine.parts.adapters.list_adapters()))

    # ----- state --------------------------------------------------------------------------
    def health(self) -> EngineHealth:
        """Cheap and thread-safe: reads two attributes, never waits for the engine thread."""
        reason = self._reason()
        return EngineHealth(healthy=reason is None, reason=reason, num_in_flight=len(self._streams))

    async def stats(self) -> dict[str, Any]:
        """``LLMEngine.stats()`` plus step and preemption counters, read on the engine thread."""

        def run(engine: LLMEngine) -> dict[str, Any]:
            stats = dict(engine.stats())
            stats["num_steps"] = engine.num_steps
            stats["num_preemptions"] = getattr(engine, "num_preemptions", 0)
            return stats

        return await self.call(run)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; in-flight requests fail with ``EngineDeadError``."""
        self._stop.set()
        self._commands.put((lambda engine: None, Future()))
        self._wakeup.set()
        self._thread.join(timeout_s)

    def _stopped_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine stopped: {self._reason() or 'shut down'}")

    def _reason(self) -> str | None:
        if self._dead_reason is not None:
            return self._dead_reason
        if self.engine.dead_reason is not None:
            return self.engine.dead_reason
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        return None

    # ----- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished_requests() and self._reason() is None
                self._run_commands(block=not busy)
                if busy and not self._stop.is_set():
                    self._step()
        finally:
            self._fail_all(self._stopped_error())
            self._drain_commands()

    def _run_commands(self, block: bool) -> None:
        try:
            if block:
                command = self._commands.get(timeout=_IDLE_WAIT_S)
            else:
                command = self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand ``outputs`` to their streams (engine thread; also the engine's ``output_sink``,
        so the deferred half's outputs leave mid-step)."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its caller, or rejected while being added
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)

    def _step(self) -> None:
        steps_before = self.engine.num_steps
        try:
            outputs = self.engine.step()
            self._unexplained_failures = 0
        except Exception as exc:  # raised outside the step's own per-step guard
            outputs = []
            self._recover(exc)
        self._deliver(outputs)
        if self._reason() is not None:
            self._fail_all(EngineDeadError(f"the engine is dead: {self._reason()}"))
        elif not outputs and self.engine.num_steps == steps_before:
            # Nothing could be scheduled (e.g. every adapter slot pinned): wait for a command
            # instead of spinning.
            self._wakeup.wait(_STALL_WAIT_S)
            self._wakeup.clear()

    def _recover(self, exc: Exception) -> None:
        """``step()`` raised outside its per-step guard (the engine fails a faulty step's
        requests itself, so this is a bug or a lost device): tolerate it up to
        ``LLMEngine.max_consecutive_step_failures`` times in a row, then mark the engine dead."""
        self._unexplained_failures += 1
        logger.exception("engine step raised (%d in a row)", self._unexplained_failures)
        if self._unexplained_failures >= LLMEngine.max_consecutive_step_failures:
            self._dead_reason = f"engine step raised {exc!r} {self._unexplained_failures} times"

    def _fail_all(self, error: EngineDeadError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)

    def _drain_commands(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(self._stopped_error())
