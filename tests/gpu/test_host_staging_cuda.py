"""The staging pool on a real device: a buffer whose upload is still queued behind device work is
never handed out again (a second lease gets another buffer, without waiting), downloads land
intact, and registered memory is page-locked (``valora.engine.host_memory``)."""

from __future__ import annotations

import pytest
import torch

from valora.engine.batch_builder import upload_ints
from valora.engine.host_memory import byte_view, packed_offsets, page_locked_empty, staging_pool

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SLEEP_CYCLES = 400_000_000  # ≈ 0.2 s of device time on a data-centre GPU


def _sleep() -> torch.cuda.Event:
    """Queue a long device sleep; the returned event completes when it ends."""
    torch.cuda._sleep(SLEEP_CYCLES)
    done = torch.cuda.Event()
    done.record()
    return done


def test_registered_memory_is_page_locked_and_copies_asynchronously() -> None:
    buffer = page_locked_empty(1 << 20, "cuda")
    assert buffer.is_pinned() and buffer.data_ptr() % 4096 == 0
    buffer.fill_(7)
    sleeping = _sleep()
    device = buffer.to("cuda", non_blocking=True)
    assert not sleeping.query()  # the copy was queued behind the sleep, not waited for
    torch.cuda.synchronize()
    assert bool((device == 7).all())


def test_a_queued_upload_keeps_its_buffer_and_the_next_lease_does_not_wait() -> None:
    pool = staging_pool(torch.device("cuda"))
    torch.cuda.synchronize()
    sleeping = _sleep()  # everything below queues behind this
    uploads = [upload_ints(torch.int64, [[step * 1000 + i for i in range(257)], [step]],
                           torch.device("cuda")) for step in range(12)]
    assert not sleeping.query()  # no lease waited for a copy queued behind the sleep
    torch.cuda.synchronize()
    for step, (values, single) in enumerate(uploads):
        assert values.tolist() == [step * 1000 + i for i in range(257)]
        assert single.tolist() == [step]
    assert 1 < pool.num_buffers <= pool.max_buffers


def test_reads_land_intact_across_dtypes() -> None:
    pool = staging_pool(torch.device("cuda"))
    pieces = [torch.arange(5, device="cuda"), torch.tensor([0.25], device="cuda"),
              torch.arange(3, device="cuda", dtype=torch.int32)]
    offsets, total = packed_offsets([p.numel() * p.element_size() for p in pieces])
    lease = pool.lease(total)
    host = [byte_view(lease.buffer, o, p).copy_(p, non_blocking=True)
            for p, o in zip(pieces, offsets, strict=True)]
    lease.mark_queued()
    lease.synchronize()
    assert host[0].tolist() == [0, 1, 2, 3, 4] and host[1].tolist() == [0.25]
    assert host[2].tolist() == [0, 1, 2]
    lease.release()
