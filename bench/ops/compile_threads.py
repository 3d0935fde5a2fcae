"""Does Triton's compiler run in parallel from Python threads? Compiles the same set of LoRA
expand binaries for sm_90 (ahead of time, no GPU needed; ``bench/model/kernel_report.py``'s
compile path) with a fresh Triton cache, once in one thread and once on ``--threads`` workers,
and prints both wall times. The LoRA warm-up (``valora.ops.warmup``) relies on the answer.

    python bench/ops/compile_threads.py [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TILES = ((16, 128, 16, 4, 2), (16, 64, 16, 4, 2), (32, 128, 32, 4, 2), (64, 128, 32, 4, 3),
         (64, 64, 32, 4, 2), (64, 128, 16, 4, 3), (128, 128, 32, 8, 3), (16, 256, 32, 8, 2))


def compile_all(threads: int, masked: bool) -> float:
    """Seconds to compile every tile of ``TILES`` on ``threads`` workers (1: in order), after
    one untimed compile of another kernel (the compiler's one-time set-up)."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    import kernel_report

    from valora.ops import lora_kernels

    flags = dict(PRECISION="tf32", UPCAST=False, CORRECTION=False)
    kernel_report.compile_for_sm90(lora_kernels.lora_shrink_kernel, "bf16",
                                   dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, EVEN_K=True,
                                        **flags), 4, 3)
    jobs = [(lora_kernels.lora_expand_kernel, "bf16",
             dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=0, MASK_B_K=masked, **flags), w, s)
            for m, n, k, w, s in TILES]
    start = time.perf_counter()
    if threads == 1:
        for job in jobs:
            kernel_report.compile_for_sm90(*job)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda job: kernel_report.compile_for_sm90(*job), jobs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement in a fresh process with a fresh, empty Triton cache
        print(f"{compile_all(args.child[0], bool(args.child[1])):.2f}")
        return
    import tempfile

    import triton

    print(f"Triton {triton.__version__}, {os.cpu_count()} CPUs, {len(TILES)} LoRA expand "
          f"binaries for sm_90, fresh cache per measurement")
    for repeat in range(args.repeats):
        for masked in (0, 1):  # two binary sets, each compiled both ways
            row = []
            for threads in (1, args.threads):
                env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(),
                       "TRITON_DEFAULT_FP_FUSION": "1"}
                out = subprocess.run([sys.executable, __file__, "--child", str(threads),
                                      str(masked)], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()[-1]
                row.append(float(out))
            print(f"repeat {repeat} set {masked}: 1 thread {row[0]:.2f} s, {args.threads} "
                  f"threads {row[1]:.2f} s ({row[0] / row[1]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
