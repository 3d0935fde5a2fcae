"""A pure-Python engine loop around the real scheduler and KV cache manager, for tests.

``SlotModel`` stands where the model runner would: it writes, for every scheduled token, a
record of what that token's K/V depends on (adapter, whole prefix, images so far) into a slot
store addressed through the request's page table, and before sampling it reads the whole context
back through the page table and checks every record. So a wrong page table, a page shared across
adapters or images, a prefix hit on stale content, or a write into a shared page fails the test.
The sampled token is a function of the request's own tokens only, so outputs must not depend on
batching, chunking or preemption.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import count

from valora.engine.scheduler import Scheduler
from valora.engine.scheduler_output import SchedulerOutput
from valora.kv_cache.block_hash import adapter_key
from valora.kv_cache.kv_cache_manager import KVCacheManager
from valora.request import ImageSpan, Request, RequestStatus
from valora.sampling_params import SamplingParams

VOCAB = 97

_ids = count()


def make_request(tokens: list[int], *, max_tokens: int = 4, adapter: str | None = None,
                 images: list[ImageSpan] | None = None, arrival_time: float | None = None,
                 request_id: str | None = None) -> Request:
    number = next(_ids)
    return Request(
        request_id=request_id or f"req-{number}",
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=max_tokens),
        adapter_name=adapter,
        adapter_digest=None if adapter is None else f"digest-{adapter}",
        images=list(images or []),
        arrival_time=float(number) if arrival_time is None else arrival_time,
    )


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + len(tokens)) % VOCAB


def reference_output(request: Request) -> list[int]:
    tokens = list(request.prompt_token_ids)
    for _ in range(request.sampling_params.max_tokens):
        tokens.append(next_token(tokens))
    return tokens[request.num_prompt_tokens:]


@dataclass
class SlotModel:
    """Fake model over a slot store (``page * page_size + offset -> record``)."""

    kv: KVCacheManager
    slots: dict[int, tuple[object, ...]] = field(default_factory=dict)

    @staticmethod
    def record(request: Request, position: int) -> tuple[object, ...]:
        images = tuple((i.digest, i.offset) for i in request.images if i.offset <= position)
        return (adapter_key(request), tuple(request.all_token_ids[:position + 1]), images)

    def _slot(self, table: list[int], position: int) -> int:
        page_size = self.kv.page_size
        return table[position // page_size] * page_size + position % page_size

    def run(self, output: SchedulerOutput) -> dict[str, int]:
        for item in output.scheduled:
            table = self.kv.page_table(item.request_id)
            assert 0 not in table
            assert len(table) * self.kv.page_size >= item.seq_len
            for position in range(item.num_computed_tokens, item.seq_len):
                page = table[position // self.kv.page_size]
                assert self.kv.pool.ref_count(page) == 1, "write into a shared page"
                self.slots[self._slot(table, position)] = self.record(item.request, position)
        sampled: dict[str, int] = {}
        for item in output.sampling:
            request = item.request
            table = self.kv.page_table(item.request_id)
            for position in range(item.seq_len):
                assert self.slots[self._slot(table, position)] == self.record(request, position)
            sampled[item.request_id] = next_token(request.all_token_ids)
        return sampled


@dataclass
class Driver:
    """The engine's side of the contract: schedule → run → advance → append → finish."""

    scheduler: Scheduler
    kv: KVCacheManager
    model: SlotModel = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.model = SlotModel(self.kv)

    def step(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        self.check(output)
        sampled = self.model.run(output)
        self.scheduler.advance(output)
        for item in output.scheduled:
            request = item.request
            token = sampled.get(item.request_id)
            if token is None or request.is_finished:
                continue
            request.output_token_ids.append(token)
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                self.scheduler.finish_request(item.request_id, RequestStatus.FINISHED_LENGTH)
        self.kv.check_invariants()
        self.steps += 1
        return output

    def run_to_completion(self, max_steps: int = 10_000) -> None:
        while self.scheduler.has_unfinished():
            self.step()
            assert self.steps < max_steps, "scheduler made no progress"

    def check(self, output: SchedulerOutput) -> None:
        config = self.scheduler.config
        assert output.num_batched_tokens == sum(i.num_new_tokens for i in output.scheduled)
        assert output.num_batched_tokens <= config.max_num_batched_tokens
        assert len(output.scheduled) <= config.max_num_seqs
        assert self.scheduler.num_running <= config.max_num_seqs
        ids = [item.request_id for item in output.scheduled]
        assert len(ids) == len(set(ids))
        running = {r.request_id for r in self.scheduler.running_requests()}
        waiting = {r.request_id for r in self.scheduler.waiting_requests()}
        assert not running & waiting
        assert set(ids) <= running
        for request in self.scheduler.waiting_requests():
            assert self.kv.page_table(request.request_id) == []
            assert request.num_computed_tokens == 0
        for request in output.preempted:
            assert request.status is RequestStatus.PREEMPTED
            assert request.request_id in waiting


@dataclass
class AdapterSlots:
    """A stand-in for adapter residency: at most ``max_slots`` distinct adapters pinned."""

    max_slots: int
    pins: Counter[str] = field(default_factory=Counter)
    admitted: Counter[str] = field(default_factory=Counter)
    released: Counter[str] = field(default_factory=Counter)
    num_refused: int = 0

    def admit(self, request: Request) -> bool:
        name = request.adapter_name
        if name is not None and name not in self.pins and len(self.pins) >= self.max_slots:
            self.num_refused += 1
            return False
        if name is not None:
            self.pins[name] += 1
        self.admitted[request.request_id] += 1
        return True

    def release(self, request: Request) -> None:
        self.released[request.request_id] += 1
        assert self.released[request.request_id] == self.admitted[request.request_id]
        name = request.adapter_name
        if name is not None:
            self.pins[name] -= 1
            if self.pins[name] == 0:
                del self.pins[name]
