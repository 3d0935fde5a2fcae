"""Policy decisions on hand-built queue snapshots (pure functions: no engine, no clock)."""

from __future__ import annotations

import pytest

from valora.errors import InvalidRequestError
from valora.orchestrator.cost_model import CostModel
from valora.orchestrator.modes import Mode, ModeState
from valora.orchestrator.policies import available_mode_policies, get_mode_policy
from valora.orchestrator.queue_view import AdapterInfo, ModeDecision, QueueView, RequestView

NOW = 100.0
GIB = 1 << 30
ADAPTERS = {"hot": AdapterInfo(64, 13 * GIB), "cold": AdapterInfo(8, 13 * GIB),
            "warm": AdapterInfo(16, 13 * GIB)}
EXPENSIVE_LORA = CostModel("sim", {"const": 8e-3, "num_tokens": 2e-5, "num_rows": 2e-5,
                                   "context_tokens": 1e-7, "attention_pairs": 1e-9,
                                   "lora_token_rank": 2e-7, "lora_segment_rank": 2e-5,
                                   "lora_segments": 2e-4, "lora_launches": 5e-4},
                           {"const": 1e-4, "bytes": 1 / 2.4e12})
FREE_LORA = CostModel("sim", {"const": 8e-3, "num_tokens": 2e-5, "num_rows": 2e-5}, {"const": 5e-3})


def req(request_id: str, adapter: str | None, arrival: float = 99.0, *, prompt: int = 0,
        output: int = 20, last: float | None = None, target: float | None = None) -> RequestView:
    rank = ADAPTERS[adapter].rank if adapter in ADAPTERS else 0
    return RequestView(request_id, adapter, rank, arrival, prompt, output, 600, target, last)


def running(request_id: str, adapter: str | None, arrival: float = 98.0) -> RequestView:
    return req(request_id, adapter, arrival, last=NOW - 0.02)


def view(run: list[RequestView], wait: list[RequestView], seats: int = 8,
         max_adapters: int | None = None) -> QueueView:
    return QueueView(tuple(run), tuple(wait), seats, 2048, max_adapters, ADAPTERS)


def test_registry() -> None:
    assert available_mode_policies() == ["dlora", "merged-only", "unmerged-fcfs", "valora"]
    with pytest.raises(InvalidRequestError, match="available"):
        get_mode_policy("nope")
    with pytest.raises(InvalidRequestError, match="bad options"):
        get_mode_policy("unmerged-fcfs", alpha=0.5)
    with pytest.raises(InvalidRequestError):
        get_mode_policy("dlora", alpha=0.3, beta=0.5)
    assert get_mode_policy("valora", cost_model=FREE_LORA).name == "valora"


def test_unmerged_fcfs_admits_in_arrival_order_within_limits() -> None:
    policy = get_mode_policy("unmerged-fcfs")
    waiting = [req("c", "warm", 3.0), req("a", "hot", 1.0), req("b", "cold", 2.0), req("d", None, 4)]
    decision = policy.decide(view([running("r", "hot")], waiting, seats=3),
                             ModeState(Mode.MIXED, "hot"), NOW)
    assert decision == ModeDecision(Mode.UNMERGED, None, ("a", "b", "c"))
    limited = policy.decide(view([running("r", "hot")], waiting, seats=4, max_adapters=2),
                            ModeState(), NOW)
    assert limited.admitted == ("a", "b", "d")  # "warm" would be a third adapter


def test_dlora_merges_above_alpha_and_unmerges_below_beta() -> None:
    policy = get_mode_policy("dlora", alpha=0.6, beta=0.4, starvation_s=5.0)
    hot = [running(f"h{i}", "hot") for i in range(5)]
    queue = view([*hot, running("c", "cold")], [req("h9", "hot"), req("w", "warm")])
    decision = policy.decide(queue, ModeState(), NOW)
    assert (decision.mode, decision.merged_adapter) == (Mode.MERGED, "hot")
    assert decision.admitted == ("h9",) and decision.deferred == ("c",)
    merged = ModeState(Mode.MERGED, "hot", since=NOW - 1)
    band = [running("h0", "hot"), running("h1", "hot"), running("c0", "cold"), req("w0", "warm")]
    assert policy.decide(view(band[:3], band[3:]), merged, NOW).mode is Mode.MERGED  # 50%
    assert policy.decide(view(band[:3], band[3:]), ModeState(), NOW).mode is Mode.UNMERGED
    low = [running("h0", "hot"), running("c0", "cold"), running("c1", "cold")]
    assert policy.decide(view(low, [req("w", "warm")]), merged, NOW) == ModeDecision(
        Mode.UNMERGED, None, ("w",))


def test_dlora_unmerges_for_a_starving_request_and_never_merges_unknown_adapters() -> None:
    policy = get_mode_policy("dlora", alpha=0.6, beta=0.4, starvation_s=5.0)
    hot = [running(f"h{i}", "hot") for i in range(6)]
    starving = req("c", "cold", arrival=NOW - 6.0)
    decision = policy.decide(view(hot, [starving]), ModeState(Mode.MERGED, "hot"), NOW)
    assert decision == ModeDecision(Mode.UNMERGED, None, ("c",))
    unknown = [running(f"x{i}", "unregistered") for i in range(6)]
    assert policy.decide(view(unknown, []), ModeState(), NOW).mode is Mode.UNMERGED


def test_merged_only_serves_one_adapter_until_it_drains() -> None:
    policy = get_mode_policy("merged-only", starvation_s=5.0)
    waiting = [req("h", "hot", 97.1), req("c", "cold", 97.0), req("c2", "cold", 97.2)]
    first = policy.decide(view([], waiting), ModeState(), NOW)
    assert first == ModeDecision(Mode.MERGED, "cold", ("c", "c2"))
    state = ModeState(Mode.MERGED, "cold")
    staying = policy.decide(view([running("c", "cold")], [req("h", "hot", 96.0)]), state, NOW)
    assert staying == ModeDecision(Mode.MERGED, "cold")
    drained = policy.decide(view([], [req("h", "hot", 97.0), req("w", "warm", 98.0)]), state, NOW)
    assert drained == ModeDecision(Mode.MERGED, "hot", ("h",))
    forced = policy.decide(view([running("c", "cold")], [req("h", "hot", NOW - 6.0)]), state, NOW)
    assert forced == ModeDecision(Mode.MERGED, "hot", ("h",), ("c",))
    base = policy.decide(view([], [req("b", None, 97.0), req("h", "hot", 98.0)]), ModeState(), NOW)
    assert base == ModeDecision(Mode.UNMERGED, None, ("b",))


def test_merged_only_does_not_stall_when_seats_hold_other_adapters() -> None:
    policy = get_mode_policy("merged-only", starvation_s=5.0)
    decision = policy.decide(view([running("c", "cold")], [req("h", "hot", 97.0)], seats=0),
                             ModeState(Mode.MERGED, "hot"), NOW)
    assert decision == ModeDecision(Mode.MERGED, "cold")


def _hot_queue() -> QueueView:
    """Mostly the hot adapter, with image-sized prompts waiting (LoRA work in prefill)."""
    run = [running(f"h{i}", "hot") for i in range(4)] + [running("c0", "cold")]
    wait = [req(f"h{i}", "hot", 99.0 + i / 100, prompt=600) for i in range(4, 10)]
    return view(run, [*wait, req("c1", "cold", 99.5, prompt=600)], seats=12)


def test_valora_merges_the_hot_adapter_when_lora_is_expensive() -> None:
    policy = get_mode_policy("valora", cost_model=EXPENSIVE_LORA, starvation_s=5.0)
    decision = policy.decide(_hot_queue(), ModeState(), NOW)
    assert decision.mode is not Mode.UNMERGED and decision.merged_adapter == "hot"
    assert policy.decide(_hot_queue(), ModeState(), NOW) == decision  # pure


def test_valora_stays_unmerged_when_merging_saves_nothing() -> None:
    policy = get_mode_policy("valora", cost_model=FREE_LORA, starvation_s=5.0)
    decision = policy.decide(_hot_queue(), ModeState(), NOW)
    assert decision == ModeDecision(Mode.UNMERGED, None, (*(f"h{i}" for i in range(4, 10)), "c1"))


def test_valora_leaves_a_merged_adapter_nobody_uses() -> None:
    policy = get_mode_policy("valora", cost_model=EXPENSIVE_LORA, starvation_s=5.0)
    run = [running(f"c{i}", "cold") for i in range(6)] + [running(f"w{i}", "warm") for i in range(6)]
    decision = policy.decide(view(run, []), ModeState(Mode.MIXED, "hot", since=0.0), NOW)
    assert decision.merged_adapter != "hot"


def test_valora_hysteresis_and_dwell_keep_the_weights() -> None:
    sticky = get_mode_policy("valora", cost_model=EXPENSIVE_LORA, starvation_s=5.0, hysteresis=0.99)
    assert sticky.decide(_hot_queue(), ModeState(), NOW).mode is Mode.UNMERGED
    dwelling = get_mode_policy("valora", cost_model=EXPENSIVE_LORA, starvation_s=5.0,
                               min_dwell_s=1.0)
    assert dwelling.decide(_hot_queue(), ModeState(since=NOW - 0.5), NOW).mode is Mode.UNMERGED
    assert dwelling.decide(_hot_queue(), ModeState(since=NOW - 2.0), NOW).merged_adapter == "hot"


def test_valora_serves_starving_requests_first_without_unmerging() -> None:
    policy = get_mode_policy("valora", cost_model=EXPENSIVE_LORA, starvation_s=5.0, min_dwell_s=60)
    run = [running(f"h{i}", "hot") for i in range(7)]
    waiting = [req(f"h{i}", "hot", 99.0) for i in range(7, 10)] + [req("c", "cold", NOW - 5.5)]
    decision = policy.decide(view(run, waiting, seats=2), ModeState(Mode.MERGED, "hot", since=NOW), NOW)
    assert (decision.mode, decision.merged_adapter) == (Mode.MIXED, "hot")
    assert decision.admitted[0] == "c"
    deferred_too_long = [running("h0", "hot"), req("c", "cold", 80.0, last=NOW - 5.5)]
    state = ModeState(Mode.MERGED, "hot", since=NOW)
    again = policy.decide(view(deferred_too_long, [], seats=4), state, NOW)
    assert again.mode is Mode.MIXED and again.deferred == ()


def test_valora_orders_admissions_by_latency_target() -> None:
    policy = get_mode_policy("valora", cost_model=FREE_LORA, starvation_s=10.0,
                             latency_targets={"warm": 1.0})
    waiting = [req("old", "cold", 95.0), req("urgent", "hot", 99.0, target=0.5),
               req("warm", "warm", 98.8)]
    assert policy.decide(view([], waiting, seats=2), ModeState(), NOW).admitted == ("urgent", "warm")


def test_valora_keeps_state_on_an_empty_queue() -> None:
    policy = get_mode_policy("valora", cost_model=EXPENSIVE_LORA)
    assert policy.decide(view([], []), ModeState(Mode.MIXED, "hot"), NOW) == ModeDecision(
        Mode.MIXED, "hot")


def test_request_view_from_engine_request() -> None:
    from valora.orchestrator.queue_view import views_from_requests
    from valora.request import Request
    from valora.sampling_params import SamplingParams

    request = Request("q", list(range(10)), SamplingParams(max_tokens=5), adapter_name="hot",
                      arrival_time=97.0, latency_target_s=2.0)
    request.num_computed_tokens = 4
    (snapshot,) = views_from_requests([request], {"hot": 64}, {"q": 99.0})
    assert snapshot == RequestView("q", "hot", 64, 97.0, 6, 5, 4, 2.0, 99.0)
    assert snapshot.wait_s(NOW) == pytest.approx(1.0) and snapshot.tokens_remaining == 11
    base = RequestView.from_request(Request("b", [1], SamplingParams()), 0)
    assert base.adapter is None and base.last_progress_time is None


def test_valora_horizon_limits_the_estimate_not_the_admissions() -> None:
    policy = get_mode_policy("valora", cost_model=FREE_LORA, horizon_requests=1)
    waiting = [req(f"w{i}", "cold", 99.0 + i / 10) for i in range(3)]
    assert policy.decide(view([], waiting, seats=3), ModeState(), NOW).admitted == ("w0", "w1", "w2")


def test_valora_needs_a_gain_beyond_its_cost_models_error() -> None:
    """A profiled model's relative step error raises the switch margin: a predicted gain inside
    the model's error does not move the weights; a confident model still merges."""
    def fitted(error: float) -> CostModel:
        return CostModel("sim", dict(EXPENSIVE_LORA.step_coefficients),
                         dict(EXPENSIVE_LORA.switch_coefficients), {"step_rel_rmse": error})

    confident = get_mode_policy("valora", cost_model=fitted(0.01), starvation_s=5.0)
    assert confident.switch_margin == pytest.approx(0.05)  # the default hysteresis
    assert confident.decide(_hot_queue(), ModeState(), NOW).merged_adapter == "hot"
    unsure = get_mode_policy("valora", cost_model=fitted(3.0), starvation_s=5.0)
    assert unsure.switch_margin == pytest.approx(0.95)  # capped
    assert unsure.decide(_hot_queue(), ModeState(), NOW).mode is Mode.UNMERGED
