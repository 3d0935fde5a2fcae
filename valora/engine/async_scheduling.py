"""Asynchronous scheduling (``SchedulerConfig.async_scheduling``; vLLM's name): ``LLMEngine.step``
schedules and launches step N+1 *before* it reads step N's tokens, so the host's scheduling, batch
building and launch run while the device computes step N. Each request that samples in a step gets
``PENDING_TOKEN`` appended when the step is launched: it counts as the token it will be, so the
scheduler plans the next step with it, and the next step's decode row takes its input id on the
device from the launched step's sampled tokens (``ModelRunner.launch``). The call that launched N+1
then reads N's tokens, replaces the placeholders and runs the usual processing — detokenisation,
every stop check, outputs — before N+1's bookkeeping (``Scheduler.advance``: the pages it caches
hold real ids) and N+1's own placeholders. So at most one step is in flight, its placeholders are
resolved before the next scheduling, and nothing on the host reads a placeholder's value. Requests
whose placeholder ends them by length (``max_tokens``, the model length) are kept out of N+1; one
that ends at N by EOS, a stop id or a stop string has run one row more in N+1, whose token is
dropped (its K/V is the real token's, written into pages that are freed afterwards and reused only
by later steps, in stream order). Outputs come with the call that launched the next step (or, when
there is none, with the call that finds nothing to schedule); tokens, texts and finish reasons are
the synchronous order's. The mode policy decides step N+1 before step N's progress and measured
time reach it (one step older than in the synchronous order). An aborted or failed request loses
its placeholder first. Everything that writes device state the step in flight reads is
stream-ordered after it: adapter slot fills (``SlotPrefetcher`` orders its stream after the current
one), weight switches (on the current stream, then synchronised), K/V pages (only later steps write
a freed page).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from valora.request import PENDING_TOKEN, Request

if TYPE_CHECKING:
    from valora.engine.scheduler_output import SchedulerOutput
    from valora.engine.setup import EngineParts
    from valora.engine.step_result import LaunchedStep, StepResult
    from valora.outputs import RequestOutput


class _Engine(Protocol):
    """What the mixin's methods use of ``LLMEngine``."""

    parts: EngineParts
    requests: dict[str, Request]
    num_steps: int
    num_preemptions: int
    _pending_outputs: list[RequestOutput]
    _in_flight: tuple[SchedulerOutput, LaunchedStep] | None
    _consecutive_failures: int

    def _schedule(self, ending: set[str] | None = None) -> SchedulerOutput: ...
    def _fail_unadmittable(self) -> list[RequestOutput]: ...
    def _step_done(self, scheduled: SchedulerOutput, result: StepResult) -> None: ...
    def _fail_step(self, scheduled: SchedulerOutput, exc: Exception) -> list[RequestOutput]: ...
    def _process_result(self, scheduled: SchedulerOutput, result: StepResult
                        ) -> list[RequestOutput]: ...
    def _finish_launched(self, scheduled: SchedulerOutput, launched: LaunchedStep
                         ) -> list[RequestOutput]: ...


class AsyncScheduling:
    """``LLMEngine``'s step under asynchronous scheduling (module docstring)."""

    _in_flight: tuple[SchedulerOutput, LaunchedStep] | None
    """The step launched and not yet read, with its schedule (None: none in flight)."""
    _pending_outputs: list[RequestOutput]

    def _step_async(self: _Engine) -> list[RequestOutput]:
        """One iteration under asynchronous scheduling (module docstring): schedule and launch
        the next step, then read and process the one in flight."""
        outputs, self._pending_outputs = self._pending_outputs, []
        previous, self._in_flight = self._in_flight, None
        ending = ({item.request_id for item in previous[0].scheduled
                   if ends_by_length(item.request, self.parts.max_model_len)}
                  if previous is not None else set())
        scheduled = self._schedule(ending)
        outputs.extend(self._fail_unadmittable())
        for request in scheduled.preempted:
            self.num_preemptions += 1
            self.parts.runner.reset_request(request.request_id)
        launched: LaunchedStep | None = None
        launch_error: Exception | None = None
        if scheduled.scheduled:
            now = time.monotonic()
            for item in scheduled.scheduled:
                if item.request.first_scheduled_time is None:
                    item.request.first_scheduled_time = now
            try:
                launched = self.parts.launch(scheduled, previous[1] if previous else None)
            except Exception as exc:  # failed before anything of it ran: its requests fail
                launch_error = exc
        if previous is not None:
            outputs.extend(self._finish_launched(*previous))
        if launch_error is not None:
            outputs.extend(self._fail_step(scheduled, launch_error))
        elif launched is not None and all(i.request.is_finished for i in scheduled.scheduled):
            # every request of it ended at the step before (EOS, stop id or string): its rows
            # are dropped; read it now so the engine is idle once its requests are done
            outputs.extend(self._finish_launched(scheduled, launched))
        elif launched is not None:
            self.parts.scheduler.advance(scheduled)
            for request in launched.sampling:  # a task head's request ends with its hidden states
                if not request.is_finished and request.request_id not in launched.result.head_hidden:
                    request.output_token_ids.append(PENDING_TOKEN)
            self._in_flight = (scheduled, launched)
        return outputs

    def _finish_launched(self: _Engine, scheduled: SchedulerOutput, launched: LaunchedStep
                         ) -> list[RequestOutput]:
        """Read a launched step's tokens, replace its placeholders and process its result as
        the synchronous ``step`` does (a failure fails that step's requests)."""
        for request in launched.sampling:
            drop_pending(request)
        try:
            result = self.parts.runner.finish(launched)
        except Exception as exc:  # a device fault surfaces when the tokens are read
            return self._fail_step(scheduled, exc)
        self._step_done(scheduled, result)
        return self._process_result(scheduled, result)


def drop_pending(request: Request) -> None:
    """Take a trailing ``PENDING_TOKEN`` off ``request`` (asynchronous scheduling)."""
    tokens = request.output_token_ids
    if tokens and tokens[-1] == PENDING_TOKEN:
        tokens.pop()


def ends_by_length(request: Request, max_model_len: int) -> bool:
    """Whether ``request``'s pending token ends it by length (``max_tokens`` or the model
    length), which the next step's schedule must not include (its position may be past both)."""
    if not request.output_token_ids or request.output_token_ids[-1] != PENDING_TOKEN:
        return False
    return (request.num_output_tokens >= request.sampling_params.max_tokens
            or request.num_tokens >= max_model_len)


def refusing(allow: Callable[[Request], bool] | None, ending: set[str] | None
             ) -> Callable[[Request], bool] | None:
    """``allow`` that also refuses the requests in ``ending``."""
    if not ending:
        return allow
    if allow is None:
        return lambda request: request.request_id not in ending
    return lambda request: request.request_id not in ending and allow(request)
