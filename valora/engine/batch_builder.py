"""Build a step's ``ForwardBatch`` from the scheduled requests (host-side bookkeeping only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from valora.engine.scheduler_output import ScheduledRequest
from valora.forward_batch import AttentionMetadata, ForwardBatch
from valora.request import ImageSpan, Request


@dataclass
class StepLayout:
    """Where each scheduled request's tokens landed in the flat batch.

    ``token_ranges[i]`` is ``(start, end)`` into the flat ``T`` tokens for ``scheduled[i]``;
    ``sampling_rows`` lists, in logits order, the indices ``i`` of requests that sample this step.
    """

    token_ranges: list[tuple[int, int]]
    sampling_rows: list[int]


@dataclass
class ImageRows:
    """The part of one image's embedding that this step places: rows ``[row_start, row_end)`` of
    the image's ``[num_image_tokens, hidden]`` embedding go to flat tokens starting at ``flat_start``."""

    span: ImageSpan
    row_start: int
    row_end: int
    flat_start: int


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
    for i, item in enumerate(scheduled):
        request = item.request
        start = request.num_computed_tokens
        end = start + item.num_new_tokens
        flat_start = len(input_ids)
        tokens = request.all_token_ids[start:end]
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
    max_pages = max((len(t) for t in tables), default=0)
    table_tensor = torch.zeros(len(tables), max(max_pages, 1), dtype=torch.int32)
    for row, pages in enumerate(tables):
        if pages:
            table_tensor[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    attn = AttentionMetadata(
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        page_table=table_tensor.to(device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        page_size=page_size,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    batch = ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        attn=attn,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
    )
    return batch, StepLayout(ranges, sampling_rows), image_rows, token_slots
