"""Greedy packing logic with a scripted fusion oracle (no models)."""

from __future__ import annotations

from collections.abc import Mapping

from valora.training.packing import TaskProfile, fusion_order, pack, similarity, verdict


def profile(name: str, single: float, requirement: float = 0.8, kind: str = "classification",
            labels: tuple[str, ...] = ("a", "b")) -> TaskProfile:
    return TaskProfile(name, kind, labels, requirement, single)


class Oracle:
    """Fusing keeps every accuracy, except that tasks in ``conflicts`` pairs drop to 0.5."""

    def __init__(self, profiles: list[TaskProfile], conflicts: set[frozenset[str]]) -> None:
        self.single = {p.name: p.single_accuracy for p in profiles}
        self.conflicts = conflicts
        self.calls: list[tuple[tuple[str, ...], str]] = []
        self.accepted: list[tuple[tuple[str, ...], str]] = []

    def try_fuse(self, members: tuple[str, ...], task: str) -> Mapping[str, float]:
        self.calls.append((members, task))
        names = (*members, task)
        def clash(n: str) -> bool:
            return any(frozenset((n, m)) in self.conflicts for m in names)
        return {n: 0.5 if clash(n) else self.single[n] for n in names}

    def accept(self, members: tuple[str, ...], task: str) -> None:
        self.accepted.append((members, task))


def test_everything_fuses_into_one_adapter() -> None:
    profiles = [profile("a", 0.9), profile("b", 0.95), profile("c", 0.85)]
    oracle = Oracle(profiles, set())
    result = pack(profiles, "similarity", 2, None, oracle.try_fuse, oracle.accept)
    assert result.adapters == [["c", "a", "b"]]  # hardest (smallest margin) first
    assert len(result.attempts) == 2 and all(a.accepted for a in result.attempts)
    assert oracle.accepted == [(("c",), "a"), (("c", "a"), "b")]


def test_conflict_rolls_back_and_opens_a_new_adapter() -> None:
    profiles = [profile("a", 0.9), profile("b", 0.9), profile("c", 0.9)]
    oracle = Oracle(profiles, {frozenset(("a", "b"))})
    result = pack(profiles, "given", 2, None, oracle.try_fuse, oracle.accept)
    assert result.adapters == [["a"], ["b", "c"]]
    rolled_back = [a for a in result.attempts if not a.accepted]
    assert len(rolled_back) == 1 and rolled_back[0].task == "b"
    assert "a 0.500 < requirement 0.800" in rolled_back[0].reasons[0]
    assert (("a",), "b") not in oracle.accepted


def test_first_fit_tries_earlier_adapters_next_fit_does_not() -> None:
    profiles = [profile("a", 0.9), profile("b", 0.9), profile("c", 0.9)]
    conflicts = {frozenset(("a", "b")), frozenset(("b", "c"))}
    given = pack(profiles, "given", 2, None, *_hooks(profiles, conflicts))
    assert given.adapters == [["a"], ["b"], ["c"]]  # next-fit only tries the latest adapter
    similar = pack(profiles, "similarity", 2, None, *_hooks(profiles, conflicts))
    assert sorted(map(sorted, similar.adapters)) == [["a", "c"], ["b"]]


def _hooks(profiles: list[TaskProfile], conflicts: set[frozenset[str]]) -> tuple:
    oracle = Oracle(profiles, conflicts)
    return oracle.try_fuse, oracle.accept


def test_unreachable_tasks_go_last_and_stay_out_unless_fusion_lifts_them() -> None:
    profiles = [profile("a", 0.9), profile("hard", 0.6), profile("b", 0.9)]
    oracle = Oracle(profiles, set())
    result = pack(profiles, "similarity", 3, None, oracle.try_fuse, oracle.accept)
    assert result.unreachable == ["hard"]
    assert oracle.calls[-1] == (("a", "b"), "hard")  # tried last, then rolled back
    assert not result.attempts[-1].accepted
    assert "hard 0.600 < requirement 0.800" in result.attempts[-1].reasons[0]
    assert result.adapters == [["a", "b"], ["hard"]]


class TransferOracle(Oracle):
    """Training ``hard`` next to ``a`` lifts it over its bar (positive transfer)."""

    def try_fuse(self, members: tuple[str, ...], task: str) -> Mapping[str, float]:
        accuracies = dict(super().try_fuse(members, task))
        if "a" in members and task == "hard":
            accuracies["hard"] = 0.85
        return accuracies


def test_fusion_can_rescue_an_unreachable_task() -> None:
    profiles = [profile("a", 0.9), profile("hard", 0.7)]
    oracle = TransferOracle(profiles, set())
    result = pack(profiles, "similarity", 2, None, oracle.try_fuse, oracle.accept)
    assert result.unreachable == ["hard"]  # reported: it missed the bar on its own
    assert result.adapters == [["a", "hard"]]
    assert result.attempts[0].accuracies["hard"] == 0.85


def test_attempts_are_bounded() -> None:
    profiles = [profile(n, 0.9) for n in "abcde"]
    everything = {frozenset((x, y)) for x in "abcde" for y in "abcde" if x != y}
    oracle = Oracle(profiles, everything)
    result = pack(profiles, "similarity", 2, None, oracle.try_fuse, oracle.accept)
    assert len(result.adapters) == 5
    assert len(oracle.calls) == 0 + 1 + 2 + 2 + 2  # never more than max_attempts per task


def test_tolerance_against_single_task_accuracy() -> None:
    profiles = {"a": profile("a", 0.95)}
    assert verdict(profiles, {"a": 0.92}, None) == ()
    assert "more than 0.020 below" in verdict(profiles, {"a": 0.92}, 0.02)[0]
    assert verdict(profiles, {"a": 0.94}, 0.02) == ()


def test_similarity_and_order() -> None:
    a = profile("a", 0.9, labels=("x", "y"))
    b = profile("b", 0.9, labels=("x", "z"))
    c = profile("c", 0.9, kind="vqa", labels=())
    assert similarity(a, b) == 0.5 + 0.5 / 3
    assert similarity(a, c) == 0.0
    ordered = fusion_order([profile("easy", 0.99), profile("far", 0.5), profile("tight", 0.81),
                            profile("near", 0.75)], "similarity")
    assert [p.name for p in ordered] == ["tight", "easy", "near", "far"]
