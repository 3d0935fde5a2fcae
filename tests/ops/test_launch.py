"""``valora.ops.launch.FastKernel``: binaries cached per specialisation key, launched directly.

A Triton function double stands in for ``@triton.jit`` (the CPU cannot compile GPU binaries): it
records every call through "Triton's path" and returns a binary double that records direct
launches. What is checked is the launcher's contract: same key → direct launch with every
argument in signature order (defaults and constexprs included) on the padded grid and the
current stream; any change Triton specialises on → Triton's path again; opting out, launch
hooks and runtimes without binaries → Triton's path always. The real kernels run through it in
every GPU test (``tests/gpu``, ``-m gpu`` op tests).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from valora.ops import launch
from valora.ops.launch import FastKernel, launcher, set_fast_launch


@dataclass
class Param:
    name: str
    is_constexpr: bool = False
    default: object = inspect.Parameter.empty


@dataclass
class Binary:
    """A ``CompiledKernel`` double: ``run`` records ``(grid, args, stream)``."""

    launches: list[tuple[tuple[int, ...], tuple[object, ...], int]] = field(default_factory=list)
    function: int = 7
    packed_metadata: tuple[int, ...] = (1, 2)

    def run(self, gx: int, gy: int, gz: int, stream: int, function: int,
            metadata: tuple[int, ...], launch_metadata: object, enter: object, exit_: object,
            *args: object) -> None:
        assert (function, metadata) == (self.function, self.packed_metadata)
        assert launch_metadata is None and enter is None and exit_ is None
        self.launches.append(((gx, gy, gz), args, stream))


@dataclass
class TritonDouble:
    params: list[Param]
    returns_binary: bool = True
    binary_type: type[Binary] = Binary
    compiles: list[tuple[tuple[int, ...], tuple[object, ...], dict[str, object]]] = field(
        default_factory=list)
    binaries: list[Binary] = field(default_factory=list)

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def run(*args: object, **kwargs: object) -> Binary | None:
            self.compiles.append((grid, args, kwargs))
            self.binaries.append(self.binary_type())
            return self.binaries[-1] if self.returns_binary else None
        return run


PARAMS = [Param("x_ptr"), Param("n"), Param("scale"), Param("mode", default=7),
          Param("BLOCK", is_constexpr=True), Param("FLAG", is_constexpr=True, default=False)]


@pytest.fixture(autouse=True)
def _cpu_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "current_stream", lambda device: 42)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_hooks_set", lambda: False)


def test_second_call_launches_the_cached_binary_directly() -> None:
    fn = TritonDouble(PARAMS)
    kernel = FastKernel(fn)
    x = torch.zeros(64)
    kernel[(3,)](x, 100, 0.5, BLOCK=32, num_warps=8)
    assert len(fn.compiles) == 1 and fn.compiles[0][2] == {"BLOCK": 32, "num_warps": 8,
                                                             "num_stages": 3}
    kernel[(5, 2)](x, 100, 0.25, BLOCK=32, num_warps=8)
    assert len(fn.compiles) == 1 and kernel.num_direct_launches == 1
    grid, args, stream = fn.binaries[0].launches[0]
    assert grid == (5, 2, 1) and stream == 42
    assert args == (x, 100, 0.25, 7, 32, False)  # signature order, defaults filled in


@pytest.mark.parametrize("change", ["int_one", "int_div16", "int64", "dtype", "misaligned",
                                    "constexpr", "warps", "stages", "pdl", "none", "device"])
def test_a_change_triton_specialises_on_takes_tritons_path(
        change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fn = TritonDouble(PARAMS)
    kernel = FastKernel(fn)
    base = torch.zeros(64, dtype=torch.float16)
    args: list[object] = [base, 100, 0.5]
    kwargs: dict[str, object] = {"BLOCK": 32}
    kernel[(1,)](*args, **kwargs)
    kernel[(1,)](*args, **kwargs)
    assert len(fn.compiles) == 1
    if change == "int_one":
        args[1] = 1
    elif change == "int_div16":
        args[1] = 96
    elif change == "int64":
        args[1] = 2**40 + 100
    elif change == "dtype":
        args[0] = base.to(torch.bfloat16)
    elif change == "misaligned":
        args[0] = base[1:]  # 2 bytes past a 16-byte boundary
    elif change == "constexpr":
        kwargs["FLAG"] = True
    elif change == "warps":
        kwargs["num_warps"] = 2
    elif change == "stages":
        kwargs["num_stages"] = 2
    elif change == "pdl":  # a programmatic dependent launch is a compile option of its own
        kwargs["launch_pdl"] = True
    elif change == "none":
        args[2] = None
    elif change == "device":  # binaries are per device: another current device compiles again
        monkeypatch.setattr(launch, "_current_device", lambda: 1)
    kernel[(1,)](*args, **kwargs)
    assert len(fn.compiles) == 2
    if change == "pdl":
        assert fn.compiles[1][2]["launch_pdl"] is True
    kernel[(1,)](*args, **kwargs)
    assert len(fn.compiles) == 2 and kernel.num_direct_launches == 2


def test_values_triton_does_not_specialise_on_share_a_binary() -> None:
    fn = TritonDouble(PARAMS)
    kernel = FastKernel(fn)
    x = torch.zeros(64)
    for n, scale in ((100, 0.5), (101, 2.0), (2**20 + 3, -1.0)):
        kernel[(1,)](x, n, scale, BLOCK=32)
    kernel[(1,)](torch.zeros(8), 5, 0.5, BLOCK=32)  # another tensor, same dtype and alignment
    assert len(fn.compiles) == 1 and kernel.num_direct_launches == 3


def test_opt_out_hooks_and_binaryless_runtimes_take_tritons_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(64)
    fn = TritonDouble(PARAMS)
    kernel = FastKernel(fn)
    set_fast_launch(False)
    try:
        for _ in range(3):
            kernel[(1,)](x, 3, 0.5, BLOCK=32)
    finally:
        set_fast_launch(True)
    assert len(fn.compiles) == 3 and kernel.num_direct_launches == 0
    kernel[(1,)](x, 3, 0.5, BLOCK=32)  # switched back on: cached from now on
    kernel[(1,)](x, 3, 0.5, BLOCK=32)
    assert len(fn.compiles) == 4 and kernel.num_direct_launches == 1

    fn = TritonDouble(PARAMS)
    kernel = FastKernel(fn)
    monkeypatch.setattr(launch, "_hooks_set", lambda: True)
    for _ in range(2):
        kernel[(1,)](x, 3, 0.5, BLOCK=32)
    assert len(fn.compiles) == 2 and kernel.num_direct_launches == 0
    monkeypatch.setattr(launch, "_hooks_set", lambda: False)

    fn = TritonDouble(PARAMS, returns_binary=False)
    kernel = FastKernel(fn)
    for _ in range(3):
        kernel[(1,)](x, 3, 0.5, BLOCK=32)
    assert len(fn.compiles) == 3 and not kernel.direct


def test_calls_the_direct_path_does_not_model_go_to_triton() -> None:
    """Other launch options, too many arguments or a required one missing: Triton's own path
    takes the call (and raises what it raises)."""
    fn = TritonDouble(PARAMS)
    kernel = FastKernel(fn)
    x = torch.zeros(4)
    for _ in range(2):
        kernel[(1,)](x, 3, 0.5, BLOCK=32, num_ctas=2)
        kernel[(1,)](*([x] * 7))
    assert len(fn.compiles) == 4 and kernel.num_direct_launches == 0
    assert fn.compiles[0][2] == {"BLOCK": 32, "num_ctas": 2}
    kernel[(1,)](x, 3)  # "scale" and BLOCK missing: the double records it; Triton would raise
    assert len(fn.compiles) == 5 and kernel.num_direct_launches == 0


def test_launcher_wraps_jit_functions_once_and_leaves_anything_else() -> None:
    from valora.ops.lora_kernels import lora_shrink_kernel

    wrapped = launcher(lora_shrink_kernel)
    interpreted = type(lora_shrink_kernel).__name__ == "InterpretedFunction"
    assert (wrapped is lora_shrink_kernel) if interpreted else isinstance(wrapped, FastKernel)
    assert launcher(lora_shrink_kernel) is wrapped
    double = TritonDouble(PARAMS)
    assert launcher(double) is double


HOOKS_SET = launch._hooks_set  # the fixture replaces the module's; these tests call the original


@pytest.mark.parametrize(("hook", "expected"), [
    (None, False), ([], False), ([print], True), ("plain", True)])
def test_launch_hooks_count_only_when_installed(monkeypatch: pytest.MonkeyPatch, hook: object,
                                                expected: bool) -> None:
    """Newer Tritons keep an empty ``HookChain`` (``.calls == []``) where older ones kept None."""
    class Chain:
        calls = hook

    value = Chain() if isinstance(hook, list) else (None if hook is None else print)

    class Knobs:
        class runtime:  # mirrors ``triton.knobs.runtime``
            launch_enter_hook = value

    monkeypatch.setattr(launch, "_knobs", lambda: Knobs)
    assert HOOKS_SET() is expected


def test_a_runtime_refusing_the_direct_call_falls_back_for_good() -> None:
    class Refusing(Binary):
        def run(self, *args: object) -> None:
            raise TypeError("launcher takes other arguments")

    fn = TritonDouble(PARAMS, binary_type=Refusing)
    kernel = FastKernel(fn)
    x = torch.zeros(64)
    for _ in range(3):
        kernel[(1,)](x, 3, 0.5, BLOCK=32)
    assert not kernel.direct and kernel.num_direct_launches == 0
    assert len(fn.compiles) == 3  # miss, refused direct call relaunched, then Triton's path


def test_constexprs_between_runtime_arguments_key_by_value() -> None:
    fn = TritonDouble([Param("x_ptr"), Param("BLOCK", is_constexpr=True), Param("n")])
    kernel = FastKernel(fn)
    x = torch.zeros(64)
    for block, n in ((32, 5), (32, 6), (64, 6), (64, 1), (64, 7)):
        kernel[(1,)](x, block, n)
    # (32, 5) compiles; (32, 6) hits; 64 compiles; n == 1 compiles; (64, 7) hits the 64 binary
    assert len(fn.compiles) == 3 and kernel.num_direct_launches == 2
    assert fn.binaries[1].launches[0][1] == (x, 64, 7)
