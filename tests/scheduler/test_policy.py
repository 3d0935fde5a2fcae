"""Policy registry and the FCFS policy."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from scheduler_sim import Driver, make_request

from valora.config import CacheConfig, SchedulerConfig
from valora.engine import policy as policy_module
from valora.engine.policy import (
    FCFSPolicy,
    SchedulingPolicy,
    available_policies,
    get_policy,
    register_policy,
)
from valora.engine.scheduler import Scheduler
from valora.errors import InvalidRequestError
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.kv_cache.page_pool import PagePool
from valora.request import Request


class ShortestPromptFirst:
    name = "shortest-prompt-first"

    def order_waiting(self, waiting: Sequence[Request], now: float) -> list[Request]:
        return sorted(waiting, key=lambda r: r.num_prompt_tokens)

    def choose_victim(self, running: Sequence[Request]) -> Request:
        return running[-1]


def test_fcfs_is_registered_and_satisfies_the_protocol() -> None:
    policy = get_policy("fcfs")
    assert isinstance(policy, FCFSPolicy)
    assert isinstance(policy, SchedulingPolicy)
    assert "fcfs" in available_policies()


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(InvalidRequestError, match=r"available: .*fcfs"):
        get_policy("nope")


def test_fcfs_orders_by_arrival_and_keeps_queue_order_on_ties() -> None:
    a = make_request([1], arrival_time=2.0)
    b = make_request([1], arrival_time=1.0)
    c = make_request([1], arrival_time=2.0)
    assert FCFSPolicy().order_waiting([a, b, c], now=10.0) == [b, a, c]
    assert FCFSPolicy().order_waiting([c, b, a], now=10.0) == [b, c, a]


def test_fcfs_victim_is_the_latest_arrival() -> None:
    a = make_request([1], arrival_time=3.0)
    b = make_request([1], arrival_time=1.0)
    c = make_request([1], arrival_time=3.0)
    assert FCFSPolicy().choose_victim([a, b]) is a
    assert FCFSPolicy().choose_victim([a, b, c]) is c  # tie: the one scheduled last
    with pytest.raises(ValueError):
        FCFSPolicy().choose_victim([])


def test_registered_policy_drives_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_module, "_POLICIES", dict(policy_module._POLICIES))
    register_policy(ShortestPromptFirst.name, ShortestPromptFirst)
    with pytest.raises(ValueError, match="already registered"):
        register_policy(ShortestPromptFirst.name, ShortestPromptFirst)
    kv = KVCacheManager(PagePool(32, 4))
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, policy=ShortestPromptFirst.name),
                          CacheConfig(page_size=4), kv, max_model_len=64)
    long, short = make_request(list(range(9)), max_tokens=1), make_request([5, 6], max_tokens=1)
    scheduler.add_request(long)
    scheduler.add_request(short)
    driver = Driver(scheduler, kv)
    assert driver.step().request_ids == [short.request_id]
    assert driver.step().request_ids == [long.request_id]
