"""The orchestrator's control plane: inference modes, in-place weight switching, the per-device
cost model and the mode policies (pure Python, tested on CPU). See ``docs/modes.md``.

The engine calls, per step: ``policy.decide(QueueView, ModeState, now) -> ModeDecision``; then
``WeightSwitcher.merge / unmerge / switch`` when the decision changes the merged adapter; then
``plan_lora_batches`` to fill ``ForwardBatch.lora`` / ``lora_correction``.
"""

from valora.orchestrator.cost_model import CostModel, RowWork, StepSpec, fit_cost_model
from valora.orchestrator.merge import SwitchReport, WeightSwitcher
from valora.orchestrator.modes import Mode, ModeState, plan_lora_batches
from valora.orchestrator.policies import (
    ModePolicy,
    available_mode_policies,
    get_mode_policy,
    register_mode_policy,
)
from valora.orchestrator.queue_view import AdapterInfo, ModeDecision, QueueView, RequestView
from valora.orchestrator.transition import apply_decision

__all__ = [
    "AdapterInfo",
    "CostModel",
    "Mode",
    "ModeDecision",
    "ModePolicy",
    "ModeState",
    "QueueView",
    "RequestView",
    "RowWork",
    "StepSpec",
    "SwitchReport",
    "WeightSwitcher",
    "apply_decision",
    "available_mode_policies",
    "fit_cost_model",
    "get_mode_policy",
    "plan_lora_batches",
    "register_mode_policy",
]
