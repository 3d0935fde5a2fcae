"""Profile the cost model on the running machine: measure steps and switches, then fit.

The engine supplies the measuring callables (this module never touches a model): for each
:class:`StepSpec` of the grid it builds a batch with those rows, mode and merged adapter, runs one
step and returns its seconds; for each switch case it merges + unmerges an adapter and returns
``(weight_bytes, seconds)`` per operation. Adapter names in the grid are ``profile-r{rank}-{i}``:
the measuring side makes a resident adapter of that rank for each name it sees (random weights are
fine — only shapes matter). The median of ``repeats`` measurements is fitted.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import TypeVar

from valora.errors import ValoraError
from valora.logger import get_logger
from valora.orchestrator.cost_model import (
    CostModel,
    RowWork,
    StepShape,
    StepSpec,
    fit_cost_model,
    step_shape,
)
from valora.orchestrator.modes import Mode

CaseT = TypeVar("CaseT")
_log = get_logger(__name__)


def adapter_name(rank: int, index: int) -> str:
    """Name of the ``index``-th profiling adapter of ``rank``."""
    return f"profile-r{rank}-{index}"


def profile_grid(
    ranks: Sequence[int] = (8, 16, 64),
    row_counts: Sequence[int] = (1, 8, 32, 64),
    prefill_tokens: Sequence[int] = (128, 512, 1024),
    adapter_counts: Sequence[int] = (1, 4),
    context_tokens: Sequence[int] = (128, 640),
) -> list[StepSpec]:
    """Steps covering every feature independently: base-only, unmerged with 1..n adapters,
    merged, and mixed with a share of rows corrected, for decode rows and single prefills.
    Three prefill lengths at least: an eager step's intercept, its linear (tokens, context) and
    quadratic (attention pairs) terms are only separable with three."""
    if not ranks or not row_counts or min(row_counts) < 1 or min(ranks) < 1:
        raise ValoraError("profile_grid needs positive ranks and row counts")
    specs: list[StepSpec] = []
    for context in context_tokens:
        for rows in row_counts:
            specs.extend(_variants([1] * rows, context, ranks, adapter_counts))
        for tokens in prefill_tokens:
            specs.extend(_variants([tokens], tokens, ranks, adapter_counts))
    return specs


def _variants(tokens: list[int], context: int, ranks: Sequence[int],
              adapter_counts: Sequence[int]) -> list[StepSpec]:
    def rows(names: Sequence[str | None], rank: int) -> tuple[RowWork, ...]:
        picked = [names[i % len(names)] for i in range(len(tokens))]
        return tuple(RowWork(name, rank if name is not None else 0, n, context)
                     for name, n in zip(picked, tokens, strict=True))

    specs = [StepSpec(rows([None], 0))]
    for rank in ranks:
        merged = adapter_name(rank, 0)
        for count in adapter_counts:
            specs.append(StepSpec(rows([adapter_name(rank, i) for i in range(count)], rank)))
        specs.append(StepSpec(rows([merged], rank), Mode.MERGED, merged, rank))
        if len(tokens) > 1:  # half the rows merged, half another adapter; then base rows only
            specs.append(StepSpec(rows([merged, adapter_name(rank, 1)], rank), Mode.MIXED,
                                  merged, rank))
            specs.append(StepSpec(rows([None], rank), Mode.MIXED, merged, rank))
    return specs


def profile(
    measure_step: Callable[[StepSpec], float],
    specs: Sequence[StepSpec],
    *,
    device_name: str,
    repeats: int = 3,
    switch_cases: Sequence[CaseT] = (),
    measure_switch: Callable[[CaseT], tuple[int, float]] | None = None,
    samples: list[dict[str, object]] | None = None,
    graph_max_rows: int = 0,
    fused_correction: bool = False,
) -> CostModel:
    """Measure every spec ``repeats`` times (median) and every switch case, then fit.
    ``graph_max_rows``: the largest decode batch ``measure_step`` replays as a CUDA graph (0 =
    none), which decides each sample's ``eager`` flag. ``fused_correction``: ``measure_step``
    runs mixed steps with the correction in the same LoRA op (one launch counted).
    ``samples`` (a list) receives every fitted sample — step features or switch bytes, the
    median seconds and the mode — so a fit can be examined or redone offline."""
    if repeats < 1:
        raise ValoraError(f"repeats must be >= 1, got {repeats}")
    if switch_cases and measure_switch is None:
        raise ValoraError("switch_cases given without measure_switch")
    step_samples: list[tuple[StepShape, float]] = []
    for spec in specs:
        seconds = statistics.median(measure_step(spec) for _ in range(repeats))
        shape = step_shape(spec, graph_max_rows, fused_correction)
        step_samples.append((shape, seconds))
        if samples is not None:
            samples.append({"kind": "step", "mode": spec.mode.value, **asdict(shape),
                            "seconds": seconds})
    switch_samples: list[tuple[int, float]] = []
    for case in switch_cases:
        assert measure_switch is not None
        measured = [measure_switch(case) for _ in range(repeats)]
        switch_samples.append((measured[0][0], statistics.median(s for _, s in measured)))
        if samples is not None:
            samples.append({"kind": "switch", "bytes": switch_samples[-1][0],
                            "seconds": switch_samples[-1][1]})
    model = replace(fit_cost_model(device_name, step_samples, switch_samples, graph_max_rows),
                    fused_correction=fused_correction)
    _log.info("cost model for %s: step rel. RMSE %.3f over %d samples", device_name,
              model.fit_info["step_rel_rmse"], len(step_samples))
    return model
