"""Scheduler unit tests: continuous batching, budgets, chunking, preemption, admission."""

from __future__ import annotations

import pytest
from scheduler_sim import AdapterSlots, Driver, make_request, reference_output

from valora.config import CacheConfig, SchedulerConfig
from valora.engine.scheduler import Scheduler
from valora.errors import InvalidRequestError, OutOfResourcesError, QueueFullError
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.kv_cache.page_pool import PagePool
from valora.request import Request, RequestStatus

PAGE = 4


def build(num_pages: int = 64, *, page_size: int = PAGE, budget: int = 64, max_num_seqs: int = 8,
          chunked: bool = True, prefix_caching: bool = True, max_waiting: int = 100,
          slots: AdapterSlots | None = None, max_model_len: int | None = None) -> Driver:
    kv = KVCacheManager(PagePool(num_pages, page_size, prefix_caching))
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                        max_waiting=max_waiting, chunked_prefill=chunked),
        CacheConfig(page_size=page_size, num_pages=num_pages, enable_prefix_caching=prefix_caching),
        kv, max_model_len=max_model_len or (num_pages - 1) * page_size,
        admit=None if slots is None else slots.admit,
        release=None if slots is None else slots.release)
    return Driver(scheduler, kv)


def shares(driver: Driver) -> dict[str, int]:
    return {item.request_id: item.num_new_tokens for item in driver.step().scheduled}


def test_new_prefill_joins_running_decodes_in_one_step() -> None:
    driver = build()
    first = make_request(list(range(10)), max_tokens=5)
    driver.scheduler.add_request(first)
    assert shares(driver) == {first.request_id: 10}
    second = make_request(list(range(20, 27)), max_tokens=3)
    driver.scheduler.add_request(second)
    output = driver.step()
    assert [(i.request_id, i.num_new_tokens, i.is_prefill) for i in output.scheduled] == [
        (first.request_id, 1, False), (second.request_id, 7, True)]
    assert all(item.samples for item in output.scheduled)


def test_chunked_prefill_splits_a_long_prompt_over_the_budget() -> None:
    driver = build(budget=8)
    request = make_request(list(range(19)), max_tokens=2)
    driver.scheduler.add_request(request)
    chunks = []
    while not request.output_token_ids:
        output = driver.step()
        (item,) = output.scheduled
        chunks.append(item.num_new_tokens)
        assert item.samples == (item.seq_len == 19)
        assert item.is_prefill
    assert chunks == [8, 8, 3]


def test_token_budget_is_shared_and_respected() -> None:
    driver = build(budget=12)
    requests = [make_request(list(range(k, k + 9)), max_tokens=3) for k in range(3)]
    for request in requests:
        driver.scheduler.add_request(request)
    assert shares(driver) == {requests[0].request_id: 9, requests[1].request_id: 3}
    # Decode of the first, rest of the second's prompt, then the third gets the remainder.
    assert shares(driver) == {requests[0].request_id: 1, requests[1].request_id: 6,
                              requests[2].request_id: 5}
    driver.run_to_completion()
    assert all(r.output_token_ids == reference_output(r) for r in requests)


def test_chunking_off_waits_until_a_prompt_fits_whole() -> None:
    driver = build(budget=12, chunked=False)
    first, second = make_request(list(range(8)), max_tokens=3), make_request(list(range(30, 39)))
    driver.scheduler.add_request(first)
    driver.scheduler.add_request(second)
    assert shares(driver) == {first.request_id: 8}  # 9 tokens neither fit the 4 left nor split
    assert shares(driver) == {first.request_id: 1, second.request_id: 9}


def test_chunking_on_fills_the_budget_left() -> None:
    driver = build(budget=12, chunked=True)
    first, second = make_request(list(range(8)), max_tokens=3), make_request(list(range(30, 39)))
    driver.scheduler.add_request(first)
    driver.scheduler.add_request(second)
    assert shares(driver) == {first.request_id: 8, second.request_id: 4}


def test_chunking_off_still_splits_a_recompute_larger_than_the_budget() -> None:
    """A preempted request's prompt + output may exceed the whole budget; it must still run."""
    driver = build(num_pages=5, budget=8, chunked=False, prefix_caching=False)
    old = make_request(list(range(4)), max_tokens=10)
    new = make_request(list(range(20, 25)), max_tokens=8)
    driver.scheduler.add_request(old)
    driver.scheduler.add_request(new)
    while new.num_preemptions == 0:
        driver.step()
        assert driver.steps < 10
    tokens_to_recompute = new.num_tokens
    assert tokens_to_recompute > 8
    chunks = []
    while not new.is_finished:
        output = driver.step()
        chunks += [(i.num_new_tokens, i.samples) for i in output.scheduled if i.request is new]
        assert driver.steps < 40
    assert chunks[:2] == [(8, False), (tokens_to_recompute - 8, True)]
    assert new.output_token_ids == reference_output(new)


def test_chunking_off_rejects_a_prompt_larger_than_the_budget() -> None:
    driver = build(budget=8, chunked=False)
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens=8"):
        driver.scheduler.add_request(make_request(list(range(9))))
    assert driver.scheduler.num_waiting == 0


def test_max_num_seqs_bounds_the_running_set() -> None:
    driver = build(max_num_seqs=2)
    requests = [make_request([k, k + 1], max_tokens=3) for k in range(5)]
    for request in requests:
        driver.scheduler.add_request(request)
    assert len(driver.step().scheduled) == 2
    assert driver.scheduler.num_running == 2 and driver.scheduler.num_waiting == 3
    driver.run_to_completion()
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests)


def test_fcfs_admits_in_arrival_order() -> None:
    driver = build(max_num_seqs=1)
    late = make_request([1, 2], max_tokens=1, arrival_time=5.0)
    early = make_request([3, 4], max_tokens=1, arrival_time=1.0)
    driver.scheduler.add_request(late)
    driver.scheduler.add_request(early)
    assert list(shares(driver)) == [early.request_id]
    assert list(shares(driver)) == [late.request_id]


def test_preemption_by_recompute_under_a_tiny_pool() -> None:
    driver = build(num_pages=6, budget=32)  # 5 usable pages = 20 tokens
    requests = [make_request(list(range(k, k + 6)), max_tokens=8) for k in range(3)]
    for request in requests:
        driver.scheduler.add_request(request)
    preempted: list[Request] = []
    while driver.scheduler.has_unfinished():
        newest_first = sorted(driver.scheduler.running_requests(), key=lambda r: -r.arrival_time)
        output = driver.step()
        preempted.extend(output.preempted)
        assert output.preempted == newest_first[:len(output.preempted)]
        for request in output.preempted:
            assert request.num_computed_tokens == 0
            assert driver.kv.page_table(request.request_id) == []
    assert preempted
    assert sum(r.num_preemptions for r in requests) == len(preempted)
    assert all(r.output_token_ids == reference_output(r) for r in requests)
    assert driver.kv.num_free_pages == driver.kv.num_usable_pages


def test_recompute_covers_prompt_and_generated_tokens() -> None:
    driver = build(num_pages=5, budget=32, prefix_caching=False)  # 4 usable pages, 16 tokens
    old = make_request(list(range(6)), max_tokens=10)
    new = make_request(list(range(20, 25)), max_tokens=4)
    driver.scheduler.add_request(old)
    driver.scheduler.add_request(new)
    while new.num_preemptions == 0:  # old grows into a third page at its 4th step
        driver.step()
        assert driver.steps < 10
    assert new.num_output_tokens == 3 and new.status is RequestStatus.PREEMPTED
    while True:
        output = driver.step()
        if new.request_id in output.request_ids:
            break
        assert driver.steps < 20
    (item,) = [i for i in output.scheduled if i.request_id == new.request_id]
    assert item.num_computed_tokens == 0
    assert item.num_new_tokens == item.num_tokens == 8
    assert item.is_prefill and item.samples
    driver.run_to_completion()
    assert old.output_token_ids == reference_output(old)
    assert new.output_token_ids == reference_output(new)


def test_victim_already_scheduled_this_step_returns_its_budget() -> None:
    driver = build(num_pages=8, budget=3, prefix_caching=False, page_size=2)  # 7 pages of 2
    late = make_request([1], max_tokens=6, arrival_time=2.0)
    early = make_request([20], max_tokens=6, arrival_time=0.0)
    chunked = make_request(list(range(40, 49)), max_tokens=6, arrival_time=1.0)
    driver.scheduler.add_request(late)
    driver.step()
    driver.scheduler.add_request(early)
    driver.scheduler.add_request(chunked)
    # Running order is [late, early, chunked] although late arrived last.
    for _ in range(4):
        assert shares(driver) == {late.request_id: 1, early.request_id: 1, chunked.request_id: 1}
    # early needs a page and none is free: the victim is late (newest), already scheduled in
    # this step; its token goes back to the budget and the chunked prefill gets it.
    output = driver.step()
    assert output.preempted == [late]
    assert [(i.request_id, i.num_new_tokens) for i in output.scheduled] == [
        (early.request_id, 1), (chunked.request_id, 2)]
    driver.run_to_completion()
    assert all(r.output_token_ids == reference_output(r) for r in (late, early, chunked))


def test_admit_false_skips_only_that_request() -> None:
    slots = AdapterSlots(max_slots=1)
    driver = build(slots=slots)
    a1 = make_request([1, 2, 3], adapter="a", max_tokens=2)
    b1 = make_request([4, 5, 6], adapter="b", max_tokens=2)
    plain = make_request([7, 8, 9], max_tokens=2)
    b2 = make_request([4, 5, 7], adapter="b", max_tokens=2)
    a2 = make_request([1, 2, 4], adapter="a", max_tokens=2)
    everyone = (a1, b1, plain, b2, a2)
    for request in everyone:
        driver.scheduler.add_request(request)
    free_before = driver.kv.num_free_pages
    output = driver.step()
    assert output.request_ids == [a1.request_id, plain.request_id, a2.request_id]
    assert slots.num_refused == 1  # b2 is skipped without asking again for adapter b
    assert driver.kv.page_table(b1.request_id) == []
    assert driver.kv.num_free_pages == free_before - 3
    assert b1.status is RequestStatus.WAITING
    driver.run_to_completion()
    assert b1.output_token_ids == reference_output(b1)
    assert slots.admitted == slots.released == {r.request_id: 1 for r in everyone}


def test_release_once_per_run_including_preemptions() -> None:
    slots = AdapterSlots(max_slots=4)
    driver = build(num_pages=6, budget=32, slots=slots)
    requests = [make_request(list(range(k, k + 6)), max_tokens=8, adapter=f"x{k % 2}")
                for k in range(3)]
    for request in requests:
        driver.scheduler.add_request(request)
    driver.run_to_completion()
    for request in requests:
        assert slots.admitted[request.request_id] == 1 + request.num_preemptions
        assert slots.released[request.request_id] == slots.admitted[request.request_id]
    assert not slots.pins


def test_prefix_hit_skips_cached_tokens() -> None:
    driver = build()
    first = make_request(list(range(13)), max_tokens=2)
    driver.scheduler.add_request(first)
    driver.step()
    second = make_request(list(range(14)), max_tokens=2)
    driver.scheduler.add_request(second)
    assert shares(driver)[second.request_id] == 2
    assert second.num_cached_tokens == 12
    driver.run_to_completion()
    assert second.output_token_ids == reference_output(second)


def test_queue_bound_rejects_with_the_bound_in_the_message() -> None:
    driver = build(max_waiting=2)
    driver.scheduler.add_request(make_request([1]))
    driver.scheduler.add_request(make_request([2]))
    with pytest.raises(QueueFullError, match="2 requests"):
        driver.scheduler.add_request(make_request([3]))
    assert driver.scheduler.num_waiting == 2


def test_add_request_validation() -> None:
    driver = build(num_pages=4, max_model_len=64)  # the pool holds 12 tokens
    request = make_request([1, 2])
    driver.scheduler.add_request(request)
    with pytest.raises(InvalidRequestError, match="already in use"):
        driver.scheduler.add_request(make_request([1], request_id=request.request_id))
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        driver.scheduler.add_request(make_request([]))
    with pytest.raises(OutOfResourcesError, match="KV"):
        driver.scheduler.add_request(make_request(list(range(10)), max_tokens=4))
    driver.scheduler.add_request(make_request(list(range(10)), max_tokens=3))  # 12 slots fit
    capped = build(num_pages=4)  # max_model_len = 12: the engine stops requests there
    capped.scheduler.add_request(make_request(list(range(10)), max_tokens=8))


def test_finish_and_abort_free_pages_and_are_idempotent() -> None:
    slots = AdapterSlots(max_slots=2)
    driver = build(slots=slots)
    running, waiting = make_request([1, 2, 3], adapter="a"), make_request([4, 5, 6])
    driver.scheduler.add_request(running)
    driver.step()
    driver.scheduler.add_request(waiting)
    driver.scheduler.abort_request(running.request_id)
    driver.scheduler.abort_request(waiting.request_id)
    driver.scheduler.abort_request(running.request_id)
    driver.scheduler.abort_request("unknown")
    assert running.status is waiting.status is RequestStatus.FINISHED_ABORTED
    assert not driver.scheduler.has_unfinished()
    assert driver.scheduler.get_request(running.request_id) is None
    assert driver.kv.num_free_pages == driver.kv.num_usable_pages
    assert slots.released == {running.request_id: 1}
    with pytest.raises(ValueError, match="not a finished status"):
        driver.scheduler.finish_request(running.request_id, RequestStatus.RUNNING)


def test_advance_skips_requests_finished_during_the_step() -> None:
    driver = build()
    request = make_request([1, 2, 3, 4, 5])
    driver.scheduler.add_request(request)
    output = driver.scheduler.schedule()
    driver.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ERROR, "boom")
    driver.scheduler.advance(output)
    assert request.error == "boom"
    assert driver.kv.num_free_pages == driver.kv.num_usable_pages


def test_token_ids_between_equals_slicing_all_token_ids() -> None:
    """``Request.token_ids_between`` (what each step's batch reads) is ``all_token_ids[a:b]``
    for every range: inside the prompt, inside the output, across the boundary, empty."""
    from scheduler_sim import make_request

    request = make_request([11, 12, 13, 14, 15])
    request.output_token_ids.extend([21, 22, 23])
    whole = request.all_token_ids
    for start in range(len(whole) + 1):
        for end in range(start, len(whole) + 2):
            assert request.token_ids_between(start, end) == whole[start:end], (start, end)
