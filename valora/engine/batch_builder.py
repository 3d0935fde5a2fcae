"""Build a step's ``ForwardBatch`` from the scheduled requests (host-side bookkeeping only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from valora.engine.host_memory import byte_view, staging_pool
from valora.engine.scheduler_output import ScheduledRequest
from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.request import PENDING_TOKEN, ImageSpan, Request


@dataclass
class StepLayout:
    """Where each scheduled request's tokens landed in the flat batch.

    ``token_ranges[i]`` is ``(start, end)`` into the flat ``T`` tokens for ``scheduled[i]``;
    ``sampling_rows`` lists, in logits order, the indices ``i`` of requests that sample this step.
    ``pending`` lists ``(flat index, request id)`` of input tokens still being sampled by the step
    in flight (``PENDING_TOKEN`` in the request: asynchronous scheduling); their ids are filled
    in on the device before the forward.
    """

    token_ranges: list[tuple[int, int]]
    sampling_rows: list[int]
    pending: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class ImageRows:
    """The part of one image's embedding that this step places: rows ``[row_start, row_end)`` of
    the image's ``[num_image_tokens, hidden]`` embedding go to flat tokens starting at ``flat_start``."""

    span: ImageSpan
    row_start: int
    row_end: int
    flat_start: int


def upload_ints(dtype: torch.dtype, lists: Sequence[Sequence[int]], device: torch.device
                ) -> list[torch.Tensor]:
    """``lists`` as 1-D ``dtype`` tensors on ``device``. On CUDA they travel through one
    page-locked staging buffer (``valora.engine.host_memory``) in one non-blocking copy (a tensor
    built from a Python list straight on the device would synchronise the host with the stream
    once per list); the results are disjoint, 16-byte-aligned views of one device buffer, valid
    in stream order."""
    if device.type != "cuda":
        return [torch.tensor(list(values), dtype=dtype, device=device) for values in lists]
    host, padded = pack_ints(dtype, lists)
    staging = staging_pool(device).lease(host.numel() * host.element_size())
    pinned = byte_view(staging.buffer, 0, host)
    pinned.copy_(host)
    flat = pinned.to(device, non_blocking=True)
    staging.mark_queued()
    staging.release()
    return unpack_ints(flat, padded, lists)


def pack_ints(dtype: torch.dtype, lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
    """One host tensor holding ``lists`` back to back, each padded with zeros to a multiple of 16
    bytes (so every piece starts 16-byte aligned, as a separately allocated tensor would: Triton
    specialises kernels on pointer alignment), and the padded lengths."""
    step = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    padded = [-(-len(values) // step) * step for values in lists]
    flat: list[int] = []
    for values, size in zip(lists, padded, strict=True):
        flat.extend(values)
        flat.extend([0] * (size - len(values)))
    return torch.tensor(flat, dtype=dtype), padded


def unpack_ints(flat: torch.Tensor, padded: Sequence[int], lists: Sequence[Sequence[int]]
                ) -> list[torch.Tensor]:
    """The views of ``flat`` (from ``pack_ints``) that hold ``lists``."""
    pieces = flat.split(list(padded))
    return [piece[:len(values)] for piece, values in zip(pieces, lists, strict=True)]


def build_forward_batch(
    scheduled: Sequence[ScheduledRequest],
    page_table_of: Callable[[str], list[int]],
    page_size: int,
    token_slots_of: Callable[[Request], int],
    device: torch.device,
) -> tuple[ForwardBatch, StepLayout, list[ImageRows], list[int]]:
    """Lay out tokens sequence after sequence; return the batch (without LoRA or image rows, which
    the runner adds), the layout, the image pieces to place and the per-token adapter slots."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    query_lens: list[int] = []
    tables: list[list[int]] = []
    ranges: list[tuple[int, int]] = []
    sampling_rows: list[int] = []
    logits_indices: list[int] = []
    image_rows: list[ImageRows] = []
    token_slots: list[int] = []
    pending: list[tuple[int, str]] = []
    for i, item in enumerate(scheduled):
        request = item.request
        start = request.num_computed_tokens
        end = start + item.num_new_tokens
        flat_start = len(input_ids)
        tokens = request.token_ids_between(start, end)
        if tokens and tokens[-1] == PENDING_TOKEN:  # only ever the last: one step in flight
            pending.append((flat_start + len(tokens) - 1, request.request_id))
        pages = page_table_of(request.request_id)
        input_ids.extend(tokens)
        positions.extend(range(start, end))
        slot_mapping.extend(
            pages[p // page_size] * page_size + p % page_size for p in range(start, end)
        )
        query_start.append(len(input_ids))
        seq_lens.append(end)
        query_lens.append(end - start)
        tables.append(pages)
        ranges.append((flat_start, len(input_ids)))
        token_slots.extend([token_slots_of(request)] * (end - start))
        if end >= request.num_tokens:
            sampling_rows.append(i)
            logits_indices.append(len(input_ids) - 1)
        for span in request.images:
            lo, hi = max(start, span.offset), min(end, span.offset + span.length)
            if lo < hi:
                image_rows.append(
                    ImageRows(span, lo - span.offset, hi - span.offset, flat_start + lo - start)
                )
    max_pages = max(max((len(t) for t in tables), default=0), 1)
    flat_table = [p for pages in tables for p in (*pages, *([0] * (max_pages - len(pages))))]
    small = upload_ints(torch.int32, [query_start, seq_lens, flat_table], device)
    large = upload_ints(torch.int64, [slot_mapping, input_ids, positions, logits_indices], device)
    attn = AttentionMetadata(
        query_start_loc=small[0],
        seq_lens=small[1],
        page_table=small[2].view(len(tables), max_pages),
        slot_mapping=large[0],
        page_size=page_size,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    batch = ForwardBatch(input_ids=large[1], positions=large[2], attn=attn,
                         logits_indices=large[3])
    return batch, StepLayout(ranges, sampling_rows, pending), image_rows, token_slots


def fill_pending_tokens(input_ids: torch.Tensor, pending: list[tuple[int, str]],
                        rows: dict[str, int], sampled: torch.Tensor) -> None:
    """Write the ``pending`` input tokens (``StepLayout.pending``) into ``input_ids`` from the
    step in flight's sampled ids (``sampled``, row ``rows[request id]``), on the device: no host
    wait. A request without a row there is an error."""
    missing = [rid for _, rid in pending if rid not in rows]
    if missing:
        raise RuntimeError(f"input tokens of {missing} are pending but the step in flight "
                           "does not sample them")
    flat, source = upload_ints(torch.int64, [[i for i, _ in pending],
                                             [rows[rid] for _, rid in pending]],
                               input_ids.device)
    input_ids.index_copy_(0, flat, sampled.index_select(0, source))
