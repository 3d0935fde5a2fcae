"""Host cost of launching a Triton kernel on the GPU machine, taken apart.

An eager step at 7B shapes spends ≈ 45 µs of host time per kernel, and a LoRA op's two Triton
launches ≈ 100 µs, while an ATen op costs ≈ 20 µs (``bench/model/eager_anatomy.py``). This
times, per call (queued behind a GPU sleep, so nothing waits for the GPU), launches of a
trivial kernel with 1 and with 8 tensor arguments through: Triton's ``kernel[grid](...)``;
valora's ``FastKernel`` (cached binary, direct); the cached binary's runner alone; the raw
``CompiledKernel.run`` with everything precomputed; the same kernel given integer addresses
instead of tensors where the runtime allows it; and an ATen in-place add for scale.

    PYTHONPATH=$PWD python bench/ops/launch_overhead.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from valora.ops.launch import FastKernel, _arg_key
from valora.ops.timing import host_time_per_call


@triton.jit
def _touch1(p0, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p0 + offs, tl.load(p0 + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def _touch8(p0, p1, p2, p3, p4, p5, p6, p7, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(p1 + offs, mask=offs < n) + tl.load(p2 + offs, mask=offs < n)
    v += tl.load(p3 + offs, mask=offs < n) + tl.load(p4 + offs, mask=offs < n)
    v += tl.load(p5 + offs, mask=offs < n) + tl.load(p6 + offs, mask=offs < n)
    v += tl.load(p7 + offs, mask=offs < n)
    tl.store(p0 + offs, v, mask=offs < n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows: dict[str, float] = {}
    n = 1024
    tensors = [torch.zeros(n, device="cuda") for _ in range(8)]
    stream = torch.cuda.current_stream().cuda_stream
    for name, kernel, ptrs in (("1ptr", _touch1, tensors[:1]), ("8ptr", _touch8, tensors)):
        values = [*ptrs, n, 256]
        grid = (4,)
        binary = kernel[grid](*ptrs, n, BLOCK=256)
        fast = FastKernel(kernel)
        fast[grid](*ptrs, n, BLOCK=256)
        rows[f"{name} triton kernel[grid]"] = host_time_per_call(lambda k=kernel, p=ptrs: k[(4,)](*p, n, BLOCK=256))
        rows[f"{name} FastKernel"] = host_time_per_call(lambda f=fast, p=ptrs: f[(4,)](*p, n, BLOCK=256))
        rows[f"{name} binary[grid](..., stream)"] = host_time_per_call(
            lambda b=binary, v=values: b[(4, 1, 1)](*v, stream=stream))
        run, function, meta = binary.run, binary.function, binary.packed_metadata
        rows[f"{name} CompiledKernel.run raw"] = host_time_per_call(
            lambda r=run, f=function, m=meta, v=values: r(4, 1, 1, stream, f, m, None, None, None,
                                                          *v))
        addresses = [t.data_ptr() for t in ptrs]
        try:
            rows[f"{name} run raw, int addresses"] = host_time_per_call(
                lambda r=run, f=function, m=meta, a=addresses: r(4, 1, 1, stream, f, m, None, None,
                                                                 None, *a, n, 256))
        except Exception as exc:  # the runtime may insist on tensors
            print(f"{name}: int addresses refused: {exc!r}")
        rows[f"{name} key only"] = host_time_per_call(lambda v=values: tuple(map(_arg_key, v)))
    rows["aten add_"] = host_time_per_call(lambda: tensors[0].add_(1.0))
    rows["current_stream().cuda_stream"] = host_time_per_call(
        lambda: torch.cuda.current_stream(tensors[0].device).cuda_stream)
    rows["torch.empty 512x192 fp32"] = host_time_per_call(
        lambda: torch.empty(512, 192, dtype=torch.float32, device="cuda"))
    rows["data_ptr() x8"] = host_time_per_call(lambda: [t.data_ptr() for t in tensors])
    for key, value in rows.items():
        print(f"{key:40} {value:8.2f} µs")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
                       "torch": torch.__version__, "host_us_per_call": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
