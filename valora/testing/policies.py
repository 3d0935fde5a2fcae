"""Mode policies for tests: fixed decisions that exercise a mode regardless of the queue."""

from __future__ import annotations

from valora.orchestrator.modes import Mode, ModeState
from valora.orchestrator.queue_view import ModeDecision, QueueView


class AlwaysMixed:
    """Keep ``adapter`` merged and run every other request on top of it (mixed mode), admitting
    the whole waiting queue each step. Register it under ``name`` for an engine to use it."""

    name = "test-always-mixed"
    adapter = "r16"

    def __init__(self, **_: object) -> None:
        pass

    def decide(self, view: QueueView, state: ModeState, now: float) -> ModeDecision:
        return ModeDecision(Mode.MIXED, self.adapter,
                            admitted=tuple(r.request_id for r in view.waiting))
