"""Accuracy-checked greedy packing of tasks into as few adapters as possible (pure logic).

Every task first gets a single-task adapter; its validation accuracy is the task's reference.
A task whose single-task adapter misses its requirement is *unreachable* on its own and is
reported as such. It is still offered to fusion — training next to related tasks can lift it
(positive transfer) — but, like every fusion, only a result in which *all* tasks meet their
requirements is kept, so an unreachable task can never drag an adapter below its bars.

- ``strategy = "given"`` (naive next-fit): tasks in spec order; each is fused into the most
  recently opened adapter; if any task of it falls below its bar, the attempt is rolled back and
  the task opens a new adapter (its single-task adapter).
- ``strategy = "similarity"`` (default; first-fit decreasing with best-fit choice): reachable
  tasks first, in order of increasing *margin* (single-task accuracy − requirement), hardest
  first, because a task with little slack should anchor an adapter rather than be squeezed into
  a full one; then unreachable tasks, closest to their bar first. Each task tries the open
  adapters in order of decreasing *similarity* (same output family — bounded heads vs generated
  text — plus label-set overlap), up to ``max_attempts`` of them, and opens a new adapter only
  if all refuse it.

A fusion is accepted when every task in the fused adapter reaches its requirement and, when a
``tolerance`` is set, stays within ``tolerance`` of its single-task accuracy. Each attempt is
made once; nothing loops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from valora.training.spec import BOUNDED_KINDS


@dataclass(frozen=True)
class TaskProfile:
    name: str
    kind: str
    labels: tuple[str, ...]
    requirement: float
    single_accuracy: float

    @property
    def margin(self) -> float:
        return self.single_accuracy - self.requirement

    @property
    def reachable(self) -> bool:
        return self.margin >= 0


@dataclass(frozen=True)
class Attempt:
    """One fusion try: ``task`` into the adapter holding ``members``."""

    adapter: int
    members: tuple[str, ...]
    task: str
    accuracies: Mapping[str, float]
    accepted: bool
    reasons: tuple[str, ...] = ()


@dataclass
class PackingResult:
    adapters: list[list[str]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


def similarity(a: TaskProfile, b: TaskProfile) -> float:
    """In ``[0, 1]``: 0.5 for the same output family, plus 0.5 × Jaccard of the label sets."""
    family = (a.kind in BOUNDED_KINDS) == (b.kind in BOUNDED_KINDS)
    union = set(a.labels) | set(b.labels)
    jaccard = len(set(a.labels) & set(b.labels)) / len(union) if union else 0.0
    return 0.5 * family + 0.5 * jaccard


def fusion_order(profiles: Sequence[TaskProfile], strategy: str) -> list[TaskProfile]:
    """Every task, in the order it is packed."""
    if strategy == "given":
        return list(profiles)
    reachable = sorted((p for p in profiles if p.reachable), key=lambda p: (p.margin, p.name))
    unreachable = sorted((p for p in profiles if not p.reachable),
                         key=lambda p: (-p.margin, p.name))
    return reachable + unreachable


def verdict(profiles: Mapping[str, TaskProfile], accuracies: Mapping[str, float],
            tolerance: float | None) -> tuple[str, ...]:
    """Reasons to reject a fused adapter (empty: accept)."""
    reasons = []
    for name, accuracy in accuracies.items():
        p = profiles[name]
        if accuracy < p.requirement:
            reasons.append(f"{name} {accuracy:.3f} < requirement {p.requirement:.3f}")
        elif tolerance is not None and accuracy < p.single_accuracy - tolerance:
            reasons.append(f"{name} {accuracy:.3f} more than {tolerance:.3f} below its "
                           f"single-task {p.single_accuracy:.3f}")
    return tuple(reasons)


def _candidates(result: PackingResult, task: TaskProfile, profiles: Mapping[str, TaskProfile],
                strategy: str, max_attempts: int) -> list[int]:
    open_bins = list(range(len(result.adapters)))
    if strategy == "given":
        return open_bins[-1:]

    def score(i: int) -> float:
        members = result.adapters[i]
        return sum(similarity(task, profiles[m]) for m in members) / len(members)
    return sorted(open_bins, key=lambda i: (-score(i), i))[:max_attempts]


def pack(profiles: Sequence[TaskProfile], strategy: str, max_attempts: int,
         tolerance: float | None,
         try_fuse: Callable[[tuple[str, ...], str], Mapping[str, float]],
         on_accept: Callable[[tuple[str, ...], str], None]) -> PackingResult:
    """Run the packing. ``try_fuse(members, task)`` trains ``task`` into the adapter holding
    ``members`` and returns every member's accuracy (the new task's included), keeping the
    candidate aside; ``on_accept(members, task)`` is called when that candidate passes, and the
    caller then makes it the adapter of ``members + (task,)``. A refused candidate is dropped
    (rolled back): the adapter stays as it was."""
    by_name = {p.name: p for p in profiles}
    result = PackingResult(unreachable=[p.name for p in profiles if not p.reachable])
    for task in fusion_order(profiles, strategy):
        placed = False
        for index in _candidates(result, task, by_name, strategy, max_attempts):
            members = tuple(result.adapters[index])
            accuracies = dict(try_fuse(members, task.name))
            reasons = verdict(by_name, accuracies, tolerance)
            attempt = Attempt(index, members, task.name, accuracies, not reasons, reasons)
            result.attempts.append(attempt)
            if not reasons:
                on_accept(members, task.name)
                result.adapters[index].append(task.name)
                placed = True
                break
        if not placed:
            result.adapters.append([task.name])
    return result
