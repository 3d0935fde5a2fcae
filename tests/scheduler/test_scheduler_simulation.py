"""Randomised engine simulation: schedule / run / advance / append / finish / abort.

Properties, for any configuration and workload hypothesis draws:

- every admitted request finishes, with the output it would have alone (the slot model checks
  every context token it reads against what was written, so page tables and prefix sharing
  across adapters and images are verified too);
- at every step: token budget and ``max_num_seqs`` hold, no page is owned twice, ref counts equal
  owners, waiting requests hold no pages;
- at the end every page is free and ``release`` was called exactly once per admitted run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scheduler_sim import AdapterSlots, Driver, make_request, reference_output

from valora.config import CacheConfig, SchedulerConfig
from valora.engine.scheduler import Scheduler
from valora.errors import InvalidRequestError, OutOfResourcesError
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.kv_cache.page_pool import PagePool
from valora.request import ImageSpan, Request, RequestStatus

IMAGE_TOKEN = 90
PREFIXES = ([1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9, 10, 11])


@st.composite
def requests(draw: st.DrawFn) -> Request:
    tokens = list(draw(st.sampled_from((*PREFIXES, ()))))
    images: list[ImageSpan] = []
    if draw(st.booleans()):
        length = draw(st.integers(1, 5))
        images.append(ImageSpan(len(tokens), length, draw(st.sampled_from(("cat", "dog")))))
        tokens += [IMAGE_TOKEN] * length
    tokens += draw(st.lists(st.integers(0, 30), max_size=8))
    if not tokens:
        tokens = [draw(st.integers(0, 30))]
    return make_request(tokens, max_tokens=draw(st.integers(1, 8)), images=images,
                        adapter=draw(st.sampled_from(("a", "b", None, "c"))))


def _add(driver: Driver, request: Request, added: list[Request]) -> None:
    try:
        driver.scheduler.add_request(request)
    except (OutOfResourcesError, InvalidRequestError):
        config = driver.scheduler.config
        need = request.num_prompt_tokens + request.sampling_params.max_tokens - 1
        too_big = driver.kv.pages_for_tokens(need) > driver.kv.num_usable_pages
        assert too_big or (not config.chunked_prefill
                           and request.num_prompt_tokens > config.max_num_batched_tokens)
        return
    added.append(request)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), page_size=st.sampled_from((1, 2, 4)), num_pages=st.integers(3, 14),
       budget=st.integers(1, 24), max_num_seqs=st.integers(1, 6), chunked=st.booleans(),
       prefix_caching=st.booleans(), max_slots=st.integers(1, 3))
def test_random_workloads_complete_and_return_every_page(
    data: st.DataObject, page_size: int, num_pages: int, budget: int, max_num_seqs: int,
    chunked: bool, prefix_caching: bool, max_slots: int,
) -> None:
    simulate(data, page_size, num_pages, budget, max_num_seqs, chunked, prefix_caching, max_slots)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), num_pages=st.integers(10, 20), budget=st.integers(4, 16),
       chunked=st.booleans())
def test_workloads_under_page_and_slot_pressure(
    data: st.DataObject, num_pages: int, budget: int, chunked: bool,
) -> None:
    """Small pools, one adapter slot, prefix caching on: preemption, refusals and prefix hits."""
    simulate(data, 2, num_pages, budget, 4, chunked, True, 1, min_requests=5, add_first=True)


def simulate(data: st.DataObject, page_size: int, num_pages: int, budget: int, max_num_seqs: int,
             chunked: bool, prefix_caching: bool, max_slots: int, min_requests: int = 2,
             add_first: bool = False) -> None:
    kv = KVCacheManager(PagePool(num_pages, page_size, prefix_caching))
    slots = AdapterSlots(max_slots)
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                        chunked_prefill=chunked),
        CacheConfig(page_size=page_size, enable_prefix_caching=prefix_caching),
        kv, max_model_len=1000, admit=slots.admit, release=slots.release)
    driver = Driver(scheduler, kv)
    pending = data.draw(st.lists(requests(), min_size=min_requests, max_size=10))
    added: list[Request] = []
    aborted: set[str] = set()

    while add_first and pending:
        _add(driver, pending.pop(0), added)
    for _ in range(data.draw(st.integers(0, 40))):
        action = data.draw(st.sampled_from(("add", "add", "step", "step", "step", "abort")))
        if action == "add" and pending:
            _add(driver, pending.pop(0), added)
        elif action == "abort" and added:
            victim = data.draw(st.sampled_from(added))
            if not victim.is_finished:
                aborted.add(victim.request_id)
            scheduler.abort_request(victim.request_id)
        else:
            driver.step()
    for request in pending:
        _add(driver, request, added)
    driver.run_to_completion(max_steps=5000)

    event(f"preempted: {any(r.num_preemptions for r in added)}")
    event(f"prefix hit: {any(r.num_cached_tokens for r in added)}")
    event(f"admit refused: {slots.num_refused > 0}")
    event(f"aborted: {bool(aborted)}")
    assert kv.num_free_pages == kv.num_usable_pages
    kv.check_invariants()
    assert scheduler.num_waiting == scheduler.num_running == 0
    assert slots.admitted == slots.released and not slots.pins
    for request in added:
        assert request.is_finished
        runs = slots.admitted[request.request_id]
        if request.request_id in aborted:
            assert request.status is RequestStatus.FINISHED_ABORTED
            assert runs in (request.num_preemptions, request.num_preemptions + 1)
        else:
            assert request.status is RequestStatus.FINISHED_LENGTH
            assert request.output_token_ids == reference_output(request)
            assert runs == request.num_preemptions + 1
