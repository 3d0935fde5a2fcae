"""Compile the GPU-path Triton kernels (paged attention; the LoRA shrink / expand, with and without
the mixed-mode correction) for sm_90 on a machine without a GPU and report what the
compiler made of them: registers, spills (stack), dynamic shared memory and the load/store and
matrix instructions in the SASS. Costs no device time (uses the ptxas/cuobjdump Triton ships).

Integer arguments that the runtime specialises as multiples of 16 (strides, head counts) and all
pointers are compiled with that divisibility, as Triton's launcher does at 7B shapes.

    python bench/model/kernel_report.py [--out FILE.md]
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from valora.layers import attention_triton_kernels as attn_kernels
from valora.ops import lora_kernels

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(os.path.dirname(triton.__file__)) / "backends" / "nvidia" / "bin"
DIVISIBLE = {"stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kp", "stride_ks",
             "stride_kh", "num_heads", "stride_x", "stride_y", "width",
             # the LoRA kernels at 7B shapes (layer widths, storage rank 64, split planes)
             "in_features", "flat_rank", "max_rank", "stride_xm", "stride_ym", "out_features",
             "col_0", "col_1", "col_2", "col_3", "col_4", "k_split", "split_stride"}
POINTERS = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "seq_lens_ptr": "*i32",
            "page_table_ptr": "*i32", "query_start_ptr": "*i32", "seqs_ptr": "*i32",
            "tiles_ptr": "*i32", "scale_log2": "fp32", "eps": "fp32",
            "h_ptr": "*fp32", "ranks_ptr": "*i32", "sorted_ptr": "*i32", "corr_ptr": "*i32",
            "scales_ptr": "*fp32", "scale_multiplier": "fp32"}
OPS = ("LDG", "LDGSTS", "STG", "STL", "LDL", "HMMA", "HGMMA")


def compile_for_sm90(fn: Any, dtype: str, constexprs: dict[str, object], num_warps: int,
                     num_stages: int) -> Any:
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[object]]] = {}
    # constexprs not given take their defaults, as a launch does (a missing one would otherwise
    # compile as a run-time integer and its static branches as run-time ones)
    constexprs = {**{p.name: p.default for p in fn.params
                     if p.is_constexpr and p.default is not inspect.Parameter.empty}, **constexprs}
    for index, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = POINTERS.get(name, f"*{dtype}" if name.endswith("_ptr") else "i32")
        if sig[name].startswith("*") or name in DIVISIBLE:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(source, target=TARGET,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def describe(kernel: Any) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([str(BIN / "cuobjdump"), "--dump-sass", f.name],
                          capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    ops: collections.Counter[str] = collections.Counter()
    for line in sass.splitlines():
        parts = line.split(";")[0].split("*/")
        words = parts[1].split() if len(parts) > 1 else []
        if words:
            op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
            if op.split(".")[0] in OPS:
                ops[op] += 1
    fields = dict(item.split(":") for item in usage.split() if item.count(":") == 1
                  and item.split(":")[0] in ("REG", "STACK"))
    return {"registers": fields.get("REG"), "stack": fields.get("STACK"),
            "dynamic_shared": kernel.metadata.shared,
            "instructions": ", ".join(f"{k}×{v}" for k, v in sorted(ops.items()))}


def cases() -> list[tuple[str, Any, str, dict[str, object], int, int]]:
    decode = dict(GROUP=1, PAGE_SIZE=16, HEAD_DIM=128, BLOCK_Q=16, BLOCK_N=64, BLOCK_D=128,
                  IDENTITY_SEQS=True, SINGLE_SPLIT=True, PRECISION="tf32", UPCAST=False)
    prefill = dict(GROUP=1, PAGE_SIZE=16, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128,
                   PRECISION="tf32", UPCAST=False)
    out: list[tuple[str, Any, str, dict[str, object], int, int]] = [
        ("decode bf16 (default: block_n 64, 4 warps, 2 stages)", attn_kernels.paged_decode_kernel,
         "bf16", decode, 4, 2),
        ("decode bf16 split-K", attn_kernels.paged_decode_kernel, "bf16",
         {**decode, "SINGLE_SPLIT": False}, 4, 2),
        ("decode bf16 GQA group 4", attn_kernels.paged_decode_kernel, "bf16",
         {**decode, "GROUP": 4}, 4, 2),
        ("decode fp32 (ieee)", attn_kernels.paged_decode_kernel, "fp32",
         {**decode, "PRECISION": "ieee"}, 4, 2),
        ("split-K reduce", attn_kernels.paged_decode_reduce_kernel, "bf16",
         dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16, IDENTITY_SEQS=True), 4, 2),
        ("prefill bf16 (64×64, 8 warps)", attn_kernels.paged_prefill_kernel, "bf16", prefill, 8,
         2),
    ]
    dot = dict(PRECISION="tf32", UPCAST=False)
    for correction in (False, True):
        tag = " + correction" if correction else ""
        flags = {**dot, "CORRECTION": correction}
        out += [
            (f"LoRA shrink, decode (16×16×256){tag}", lora_kernels.lora_shrink_kernel, "bf16",
             dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, EVEN_K=True, **flags), 4, 3),
            (f"LoRA shrink, prefill (64×32×64){tag}", lora_kernels.lora_shrink_kernel, "bf16",
             dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, EVEN_K=True, **flags), 4, 4),
            (f"LoRA expand, decode (16×128×16, SPLIT_K 4){tag}, B tail masked",
             lora_kernels.lora_expand_kernel, "bf16",
             dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, SPLIT_K=4, MASK_B_K=True, **flags), 4, 2),
            (f"LoRA expand, decode (16×128×16, SPLIT_K 4){tag}",
             lora_kernels.lora_expand_kernel, "bf16",
             dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, SPLIT_K=4, MASK_B_K=False, **flags), 4, 2),
            (f"LoRA expand, prefill (64×128×32){tag}, B tail masked",
             lora_kernels.lora_expand_kernel, "bf16",
             dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, SPLIT_K=0, MASK_B_K=True, **flags), 4, 3),
            (f"LoRA expand, prefill (64×128×32){tag}", lora_kernels.lora_expand_kernel, "bf16",
             dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, SPLIT_K=0, MASK_B_K=False, **flags), 4, 3),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"# sm_90 compile report (Triton {triton.__version__}, no GPU used)", "",
             "| kernel | regs | stack | dyn. shared B | SASS loads/stores/MMA |",
             "| --- | --- | --- | --- | --- |"]
    for name, fn, dtype, constexprs, warps, stages in cases():
        info = describe(compile_for_sm90(fn, dtype, constexprs, warps, stages))
        lines.append(f"| {name} | {info['registers']} | {info['stack']} | "
                     f"{info['dynamic_shared']} | {info['instructions']} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
