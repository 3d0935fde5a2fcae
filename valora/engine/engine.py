"""``LLMEngine``: add requests, step, abort. The synchronous core that ``LLM`` and the HTTP
server drive.

Each ``step`` schedules a batch under the token budget, runs it, appends sampled tokens, checks
stop conditions and returns the outputs of requests that progressed. A failure while preparing
one request fails that request only; a failure inside the model step fails the requests of that
step and, after ``max_consecutive_step_failures`` in a row, marks the engine dead. A device fault
(a CUDA error: ``valora.engine.faults.is_device_fault``) marks it dead at once — the CUDA
context is unusable afterwards — so ``is_healthy`` (and the server's ``/health``) report it
instead of later steps hanging or failing one by one.

Asynchronous output processing (``SchedulerConfig.async_output_processing``; vLLM had the same
under that name): a step's sampled tokens are handled in two halves. At once: append the token
and its logprobs, and the checks that need only the token — EOS, stop token ids, ``max_tokens``,
the model length — which finish the request before the next step is scheduled. Deferred to the
next step, and run on the host while that step's device work runs (``execute``'s
``while_device_runs``: during a decode-graph replay, else before the step's forward): the
detokenisation, the stop-string check and the ``RequestOutput`` objects. A request's first token
and a token that ends it by a token-level check are not deferred (the previous step's deferred
half has always run by then, so the order holds): the first token and the final output reach the
caller as in the synchronous order; only the outputs in between come one step later. A stop
string found in the deferred half finishes its request after it was scheduled once more; that
step's token for it is dropped, so tokens, texts and finish reasons equal the synchronous
order's. ``has_unfinished_requests`` stays true until the last deferred half has run (a step
with nothing to schedule runs it), and ``abort_request`` runs it first.

``output_sink`` (None by default): a callable that receives outputs as soon as the deferred half
has built them — inside the next step, before its forward (eager and piecewise steps) or while
its decode graph replays — instead of with that step's return value. Without it those outputs
wait for the whole next step: on an H200 serving A/B (session 11, before first and final tokens
were taken out of the deferred half) that put asynchronous output processing behind the
synchronous order in latency at every point. Outputs reach the sink and
the return value in the order they were built (everything built earlier in the step goes to the
sink first); the server's engine thread and the in-process benchmark set it.

Asynchronous scheduling (``SchedulerConfig.async_scheduling``): ``step`` launches step N+1
before it reads step N's tokens (``valora.engine.async_scheduling``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from valora.config import EngineConfig
from valora.engine.async_scheduling import AsyncScheduling, drop_pending, refusing
from valora.engine.faults import is_device_fault, retain_for_process
from valora.engine.inputs import GenerateRequest
from valora.engine.outputs_builder import build_output
from valora.engine.scheduler_output import SchedulerOutput
from valora.engine.setup import EngineParts, build_engine_parts
from valora.engine.step_result import StepResult
from valora.errors import EngineDeadError, InvalidRequestError, ValoraError
from valora.logger import get_logger
from valora.outputs import RequestOutput
from valora.request import Request, RequestStatus

logger = get_logger(__name__)


class LLMEngine(AsyncScheduling):
    """The synchronous engine (not thread-safe: one caller drives it)."""

    max_consecutive_step_failures = 3

    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        self.config = config
        self.parts = parts or build_engine_parts(config)
        self.requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        # Tokens whose detokenisation and output wait for the next step (async output
        # processing); never one that ends its request by a token-level check.
        self._deferred: list[tuple[Request, int]] = []
        self._async_outputs = config.scheduler.async_output_processing
        self._async_scheduling = config.scheduler.resolved_async_scheduling(
            self.parts.device.type)
        self._in_flight = None
        self.output_sink: Callable[[list[RequestOutput]], None] | None = None
        """Receives the deferred half's outputs as soon as they are built (module docstring)."""
        self._consecutive_failures = 0
        self.dead_reason: str | None = None
        self.num_steps = 0
        self.num_preemptions = 0

    @property
    def async_scheduling(self) -> bool:
        """Whether ``step`` schedules asynchronously (``SchedulerConfig.async_scheduling``
        resolved for this engine's device)."""
        return self._async_scheduling

    # ----- requests -------------------------------------------------------------------------
    def add_request(self, spec: GenerateRequest) -> Request:
        """Validate ``spec`` and queue it. Raises a typed ``ValoraError`` for bad input or a full
        queue; nothing is queued then."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")
        if spec.request_id is not None and spec.request_id in self.requests:
            raise InvalidRequestError(f"request id {spec.request_id!r} is already in use")
        request = self.parts.inputs.process(spec)
        if request.adapter_name is not None:
            request.adapter_digest = self.parts.adapters.digest(request.adapter_name)
        head = self.parts.head_of(request.adapter_name, request.task)  # validates the head now
        if head is not None:
            if head.num_input_tokens > request.num_prompt_tokens:
                raise InvalidRequestError(
                    f"the task head reads the last {head.num_input_tokens} prompt tokens but the prompt "
                    f"has {request.num_prompt_tokens}"
                )
            request.num_recompute_tail = head.num_input_tokens
        self.parts.scheduler.add_request(request)
        self.requests[request.request_id] = request
        return request

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its pages and adapter pin (unknown ids are ignored)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self._pending_outputs.extend(self._run_deferred())  # its last token's text first
        if request.is_finished:
            return
        drop_pending(request)
        self.parts.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._pending_outputs.append(self._retire(request))

    def set_mode_policy(self, name: str) -> None:
        """Serve with mode policy ``name`` from now on (``ModeController.set_policy``). Only
        between requests: raises ``InvalidRequestError`` while any request is unfinished, or
        when the engine has no mode controller (no adapter slots)."""
        if self.has_unfinished_requests():
            raise InvalidRequestError("set_mode_policy: requests are unfinished; drain first")
        if self.parts.modes is None:
            raise InvalidRequestError("set_mode_policy: this engine serves no adapters")
        self.parts.modes.set_policy(name)

    def reset_caches(self) -> None:
        """Forget the prefix cache's page hashes and the image-embedding cache, so the next
        request computes everything (benchmarks replaying one workload several times on one
        engine). Only between requests: raises ``InvalidRequestError`` otherwise."""
        if self.has_unfinished_requests():
            raise InvalidRequestError("reset_caches: requests are unfinished; drain first")
        self.parts.kv_manager.pool.reset_prefix_cache()
        self.parts.runner.image_cache.clear()

    def has_unfinished_requests(self) -> bool:
        return (
            any(not r.is_finished for r in self.requests.values())
            or bool(self._pending_outputs)
            or bool(self._deferred)
            or self._in_flight is not None
        )

    # ----- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return outputs of requests that produced tokens or finished."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")
        if self._async_scheduling:
            return self._step_async()
        outputs, self._pending_outputs = self._pending_outputs, []
        scheduled = self._schedule()
        outputs.extend(self._fail_unadmittable())
        for request in scheduled.preempted:
            self.num_preemptions += 1
            self.parts.runner.reset_request(request.request_id)
        if not scheduled.scheduled:
            return outputs + self._run_deferred()
        now = time.monotonic()
        for item in scheduled.scheduled:
            if item.request.first_scheduled_time is None:
                item.request.first_scheduled_time = now
        deferred: list[RequestOutput] = []

        def deferred_half() -> None:
            built = self._run_deferred()
            sink = self.output_sink
            if sink is None:
                deferred.extend(built)
                return
            early = outputs + built  # what the step built before them goes first
            outputs.clear()
            if early:
                sink(early)

        try:
            if self._deferred:  # the last step's deferred half runs while this one computes
                result = self.parts.execute(scheduled, deferred_half)
            else:
                result = self.parts.execute(scheduled)
        except Exception as exc:  # a fault inside the step fails that step's requests only
            outputs += deferred + self._run_deferred()
            return outputs + self._fail_step(scheduled, exc)
        outputs += deferred + self._run_deferred()  # the step sampled nothing: run it now
        self.parts.scheduler.advance(scheduled)
        self._step_done(scheduled, result)
        outputs.extend(self._process_result(scheduled, result))
        return outputs

    def _step_done(self, scheduled: SchedulerOutput, result: StepResult) -> None:
        """Count a step that ran and tell the mode controller: its rows that are still alive
        (not retired by the deferred half of async output processing during the step) and its
        measured time."""
        self._consecutive_failures = 0
        self.num_steps += 1
        modes = self.parts.modes
        if modes is not None:
            alive = [rid for rid in scheduled.request_ids if rid in self.requests]
            modes.after_step(alive, time.monotonic())
            modes.observe_step(scheduled.scheduled, result.seconds, result.graphed)

    def _schedule(self, ending: set[str] | None = None) -> SchedulerOutput:
        """Ask the mode controller (if any) which requests may run, then schedule under that."""
        scheduler = self.parts.scheduler
        modes = self.parts.modes
        allow = None
        if modes is not None:
            allow = modes.before_schedule(
                scheduler.running_requests(), scheduler.waiting_requests(), time.monotonic()
            )
        scheduled = scheduler.schedule(refusing(allow, ending))
        if allow is not None and not scheduled.scheduled and scheduler.has_unfinished():
            # The decision admitted nothing runnable; any batch is correct under mixed semantics.
            scheduled = scheduler.schedule(refusing(None, ending))
        return scheduled

    def _process_result(
        self, scheduled: SchedulerOutput, result: StepResult
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for item in scheduled.scheduled:
            request = item.request
            rid = request.request_id
            if request.is_finished:
                continue
            if rid in result.head_hidden:
                try:
                    outputs.append(self._finish_with_head(request, result, now))
                except Exception as exc:  # a broken head fails its own request only
                    outputs.append(self._fail_request(request, exc))
                continue
            token = result.sampled.get(rid)
            if token is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            request.output_token_ids.append(token)
            if rid in result.logprobs:
                request.output_logprobs.append(
                    {token: result.logprobs[rid].logprob, **result.logprobs[rid].top}
                )
            if (self._async_outputs and len(request.output_token_ids) > 1
                    and self._token_stop_status(request, token)[0] is None):
                self._deferred.append((request, token))
                continue
            # (async output processing: a first token and a token that ends the request by a
            # token-level check are handled at once — nothing of theirs is deferred, as the
            # deferred half of the step before has already run)
            stop_string = self.parts.detokenizer_of(request).add_tokens([token])
            status, reason = self._stop_status(request, token, stop_string)
            if status is not None:
                self.parts.scheduler.finish_request(rid, status)
                outputs.append(self._retire(request, stop_reason=reason))
            else:
                outputs.append(self._output(request))
        return outputs

    def _run_deferred(self) -> list[RequestOutput]:
        """The deferred half of async output processing (module docstring): detokenise each
        waiting token, check stop strings, build the outputs; retire finished requests."""
        items, self._deferred = self._deferred, []
        outputs = []
        for request, token in items:
            rid = request.request_id
            if self.requests.get(rid) is not request:
                continue  # retired meanwhile (a failed step); every finish retires
            stop_string = self.parts.detokenizer_of(request).add_tokens([token])
            if stop_string is not None:
                self.parts.scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)
                outputs.append(self._retire(request, stop_reason=stop_string))
            else:
                outputs.append(self._output(request))
        return outputs

    def _stop_status(
        self, request: Request, token: int, stop_string: str | None
    ) -> tuple[RequestStatus | None, str | int | None]:
        if stop_string is not None:
            return RequestStatus.FINISHED_STOPPED, stop_string
        return self._token_stop_status(request, token)

    def _token_stop_status(
        self, request: Request, token: int
    ) -> tuple[RequestStatus | None, str | int | None]:
        """The stop checks that need only the token: stop ids, EOS, lengths."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
            if token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
        if (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.parts.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _finish_with_head(self, request: Request, result: StepResult, now: float) -> RequestOutput:
        request.first_token_time = now
        head_output = self.parts.run_head(request, result.head_hidden[request.request_id])
        self.parts.detokenizer_of(request).text = head_output["label"]
        self.parts.head_results[request.request_id] = head_output
        self.parts.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        return self._retire(request)

    def _fail_unadmittable(self) -> list[RequestOutput]:
        """Fail requests whose adapter could not be pinned for good (e.g. unloaded meanwhile)."""
        failed = []
        for request, error in self.parts.take_admission_failures():
            if not request.is_finished:
                message = f"{type(error).__name__}: {error}"
                self.parts.scheduler.finish_request(
                    request.request_id, RequestStatus.FINISHED_ERROR, message
                )
                request.error = message
                failed.append(self._retire(request))
        return failed

    def _fail_request(self, request: Request, exc: Exception) -> RequestOutput:
        drop_pending(request)
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("request %s failed: %s", request.request_id, message)
        self.parts.scheduler.finish_request(
            request.request_id, RequestStatus.FINISHED_ERROR, message
        )
        request.error = message
        return self._retire(request)

    def _fail_step(self, scheduled: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        self._consecutive_failures += 1
        device_fault = is_device_fault(exc)
        if device_fault:
            message = f"device error in step (the engine is now unhealthy): {exc}"
        elif isinstance(exc, ValoraError):
            message = f"{type(exc).__name__}: {exc}"
        else:
            message = f"internal error in step: {exc!r}"
        logger.exception("step failed; failing %d request(s)", len(scheduled.scheduled))
        outputs = []
        for item in scheduled.scheduled:
            request = item.request
            if not request.is_finished:
                drop_pending(request)
                self.parts.scheduler.finish_request(
                    request.request_id, RequestStatus.FINISHED_ERROR, message
                )
                request.error = message
                outputs.append(self._retire(request))
        if device_fault:
            self.dead_reason = f"device error in step: {exc}"
            retain_for_process(self)  # nothing of it may be freed against a dead context
            logger.error("engine marked dead: %s", self.dead_reason)
        elif self._consecutive_failures >= self.max_consecutive_step_failures:
            self.dead_reason = (
                f"{self._consecutive_failures} consecutive step failures; last: {message}"
            )
            logger.error("engine marked dead: %s", self.dead_reason)
        return outputs

    def _retire(self, request: Request, stop_reason: str | int | None = None) -> RequestOutput:
        """Build the request's final output, then forget every piece of per-request state."""
        output = self._output(request, stop_reason)
        self.parts.runner.release(request.request_id)
        self.requests.pop(request.request_id, None)
        self.parts.forget(request.request_id)
        return output

    def _output(self, request: Request, stop_reason: str | int | None = None) -> RequestOutput:
        return build_output(
            request,
            self.parts.detokenizer_of(request),
            self.parts.head_results.get(request.request_id),
            stop_reason,
        )

    # ----- introspection --------------------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None

    def stats(self) -> dict[str, Any]:
        return {**self.parts.stats(), "num_preemptions": self.num_preemptions,
                "async_scheduling": self.async_scheduling}

