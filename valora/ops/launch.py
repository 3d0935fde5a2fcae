"""Low-latency launches of ``@triton.jit`` kernels: the compiled binary cached per specialisation.

An eager (prefill) step at 7B shapes launches ≈ 160 Triton kernels (+ 256 per LoRA pass) and is
host-bound: measured on an H200 host (``bench/model/eager_anatomy.py``,
``bench/ops/launch_overhead.py``), Triton's ``kernel[grid](...)`` costs 18–22 µs per launch, the
compiled binary's own ``run`` 8–10 µs, an ATen op ≈ 8 µs. Triton's launch path does, per call,
work that is constant for a call site: reading its option knobs, querying the device and stream,
binding and specialising every argument, turning the specialisation into a string key and
looking it up, building launch metadata for hooks. :class:`FastKernel` keeps Triton's semantics
and does less:

- a cheap key per call: per argument exactly the facts Triton specialises on — a tensor's dtype
  and whether its address is 16-byte aligned; an integer's width class (i32 / i64 / u64),
  whether it equals 1 and whether it is a multiple of 16; the value of a ``constexpr``; the type of
  anything else — plus ``num_warps`` / ``num_stages`` and the current device (Triton launches on
  the current device, as here). Two calls with equal keys get the same
  binary from Triton too (the key records at least what Triton's does; it may record more, which
  only compiles a binary Triton would have shared);
- on a miss, the call goes through Triton's own path once (which compiles or finds the binary
  and launches it) and the returned ``CompiledKernel`` is cached under the key;
- on a hit, the binary is launched directly on the current stream with every argument in
  signature order (``CompiledKernel.run``, the call Triton's own path ends in; no launch
  metadata is built, since no hook will read it).

Falls back to the plain Triton path where the direct launch does not apply: the CPU interpreter
(``TRITON_INTERPRET=1``), a Triton without ``CompiledKernel`` runners, launch hooks set (a
profiler), or ``VALORA_FAST_LAUNCH=0``. The result of a kernel never depends on the path taken.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

_INT32 = 2**31
_INT64 = 2**63


_ENABLED = [os.environ.get("VALORA_FAST_LAUNCH", "1") != "0"]


def fast_launch_enabled() -> bool:
    """Whether launches may skip Triton's path: ``VALORA_FAST_LAUNCH`` unset or not ``0`` at
    import, or as last set by ``set_fast_launch``."""
    return _ENABLED[0]


def set_fast_launch(enabled: bool) -> None:
    """Switch direct launches on or off for every launcher from now on (benchmarks compare the
    two paths in one process)."""
    _ENABLED[0] = enabled


def _arg_key(value: object) -> object:
    """What Triton specialises a runtime argument on (module docstring)."""
    cls = type(value)
    if cls is int:
        width = 0 if -_INT32 <= value < _INT32 else 1 if -_INT64 <= value < _INT64 else 2  # type: ignore[operator]
        return width, value == 1, value & 15 == 0  # type: ignore[operator]
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    if cls is bool or value is None:
        return cls
    if isinstance(value, int):  # an int subclass (numpy ints are not)
        return _arg_key(int(value))
    return cls


_OPTIONS = frozenset({"num_warps", "num_stages", "launch_pdl"})
"""The launch options the direct path keys by; any other keyword goes to Triton's path."""


_INT_KEYS: dict[int, object] = {}
"""``_arg_key`` of the integers seen (a memo; they repeat: layer widths, strides, counts)."""


def _runtime_keys(values: Sequence[object]) -> list[object]:
    """``[_arg_key(v) for v in values]``, the common cases inline: this runs on every launch, and
    a function call per argument was ≈ 40 % of the direct path's host time."""
    keys: list[object] = []
    append = keys.append
    tensor = torch.Tensor
    for value in values:
        cls = type(value)
        if cls is tensor:
            append((value.dtype, value.data_ptr() & 15 == 0))  # type: ignore[attr-defined]
        elif cls is int:
            key = _INT_KEYS.get(value)  # type: ignore[call-overload]
            if key is None:
                if len(_INT_KEYS) > 65536:
                    _INT_KEYS.clear()
                key = _INT_KEYS[value] = _arg_key(value)  # type: ignore[index]
            append(key)
        else:
            append(_arg_key(value))
    return keys


def _picker(indices: Iterable[int]) -> Callable[[Sequence[object]], tuple[object, ...]]:
    """``values -> tuple(values[i] for i in indices)``, in C (``operator.itemgetter``)."""
    chosen = tuple(indices)
    if not chosen:
        return lambda values: ()
    if len(chosen) == 1:
        index = chosen[0]
        return lambda values: (values[index],)
    return operator.itemgetter(*chosen)


class FastKernel:
    """Wraps a ``@triton.jit`` function; ``FastKernel(fn)[grid](*args, **kwargs)`` launches it
    exactly as ``fn[grid](*args, **kwargs)`` would (module docstring)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        params = list(getattr(fn, "params", None) or ())
        self.direct = bool(params)
        """False: every launch takes Triton's path (no parameters known, or no binaries)."""
        self._names = tuple(p.name for p in params)
        self._constexprs = _picker(i for i, p in enumerate(params) if p.is_constexpr)
        self._runtime = _picker(i for i, p in enumerate(params) if not p.is_constexpr)
        """The constexpr / runtime arguments of a call's values, in signature order."""
        self._defaults = {p.name: p.default for p in params
                          if p.default is not inspect.Parameter.empty}
        self._accepted = frozenset(self._names) | _OPTIONS
        self._binaries: dict[tuple[object, ...], Any] = {}
        self.num_direct_launches = 0
        """Launches that skipped Triton's path (for tests and benchmarks)."""

    def __getitem__(self, grid: Sequence[int]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: Sequence[int], args: Sequence[object],
               kwargs: dict[str, Any]) -> None:
        """``fn[grid](*args, **kwargs)``, directly when the binary is known (module docstring)."""
        names = self._names
        if (not (self.direct and _ENABLED[0]) or _hooks_set() or len(args) > len(names)
                or not self._accepted.issuperset(kwargs)):
            # Switched off, a hook to honour, or a call this path does not model (other launch
            # options, wrong arguments): Triton's own path decides, errors included.
            self.fn[grid](*args, **kwargs)
            return
        options = {"num_warps": kwargs.pop("num_warps", 4),
                   "num_stages": kwargs.pop("num_stages", 3)}
        if kwargs.pop("launch_pdl", False):  # a compile option: the binary launches with it
            options["launch_pdl"] = True
        values = list(args)
        for name in names[len(args):]:
            if name in kwargs:
                values.append(kwargs[name])
            elif name in self._defaults:
                values.append(self._defaults[name])
            else:  # a required argument missing: Triton's path raises its error
                self.fn[grid](*args, **options, **kwargs)
                return
        device = _current_device()
        key = (device, options["num_warps"], options["num_stages"], "launch_pdl" in options,
               *self._constexprs(values), *_runtime_keys(self._runtime(values)))
        binary = self._binaries.get(key)
        if binary is None:
            compiled = self.fn[grid](*args, **options, **kwargs)
            runner = _runner(compiled)
            if runner is None:  # a Triton whose launches return no runnable binary
                self.direct = False
            else:
                self._binaries[key] = runner
            return
        run, function, metadata = binary
        try:
            run(*(*grid, 1, 1)[:3], current_stream(device), function, metadata, None, None, None,
                *values)
        except TypeError:  # a runtime whose launcher takes other arguments: Triton's path
            self.direct = False
            self.fn[grid](*args, **options, **kwargs)
            return
        self.num_direct_launches += 1


def _runner(compiled: Any) -> tuple[Any, Any, Any] | None:
    """``(run, function, packed_metadata)`` of a ``CompiledKernel`` (what Triton's own launch
    ends in: ``run(gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook,
    exit_hook, *args)``), or None when ``compiled`` has none of them."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
    parts = tuple(getattr(compiled, name, None) for name in ("run", "function", "packed_metadata"))
    return None if any(part is None for part in parts) else parts  # type: ignore[return-value]


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: int) -> int:
    """The raw handle of CUDA device ``device``'s current stream (what Triton launches on)."""
    if _RAW_STREAM is not None:
        return int(_RAW_STREAM(device))
    return int(torch.cuda.current_stream(device).cuda_stream)


def _current_device() -> int:
    """The current CUDA device's index (Triton compiles and launches for it)."""
    return torch.cuda.current_device()


def _hooks_set() -> bool:
    """Whether a launch hook (a profiler) is installed: those launches take Triton's path.
    Newer Tritons keep an always-present, usually empty ``HookChain`` there."""
    knobs = _knobs()
    if knobs is None:
        return False
    hook = knobs.runtime.launch_enter_hook
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return True if calls is None else bool(calls)


@functools.cache
def _knobs() -> Any:
    try:
        from triton import knobs
    except ImportError:  # an older Triton: no knobs, no hooks
        return None
    return knobs


_LAUNCHERS: dict[int, tuple[Any, Any]] = {}


def launcher(fn: Any) -> Any:
    """The launcher of ``fn`` (one per function object, made on first use): a
    :class:`FastKernel`, or ``fn`` itself under the CPU interpreter (``TRITON_INTERPRET=1``),
    whose launches have no binaries to cache, or for anything that is not a Triton function
    (a test double). ``launcher(kernel)[grid](*args, **kwargs)`` replaces ``kernel[grid](...)``.
    """
    entry = _LAUNCHERS.get(id(fn))
    if entry is not None and entry[0] is fn:
        return entry[1]
    from triton.runtime.jit import JITFunction

    wrapped = FastKernel(fn) if isinstance(fn, JITFunction) else fn
    _LAUNCHERS[id(fn)] = (fn, wrapped)
    return wrapped


__all__ = ["FastKernel", "current_stream", "fast_launch_enabled", "launcher"]
