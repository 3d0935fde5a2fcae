"""Engine cold start and memory on a GPU at LLaVA-1.5-7B shapes: how long ``LLM(...)`` takes
(dummy weights, KV cache, adapter slots, the LoRA kernel warm-up, CUDA-graph capture) with an
empty Triton cache, where the memory goes (the engine's memory plan, logged at info level), and
the latency of the first requests after it (the same prompt twice, then new prompt sizes: what
first-use compilation adds).

    TRITON_CACHE_DIR=$(mktemp -d) python bench/model/engine_start_gpu.py --model DIR
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from valora import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    start = time.perf_counter()
    llm = LLM(model=args.model, device="cuda", dtype="bfloat16", load_format="dummy",
              num_pages=4096, max_num_seqs=64, max_loras=16, max_lora_rank=64)
    built = time.perf_counter() - start
    allocated = torch.cuda.memory_allocated() / 2**20
    reserved = torch.cuda.memory_reserved() / 2**20
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    requests = []
    for words in (3, 3, 40, 200):  # the first request, the same again, then new prompt sizes
        prompt = "USER: " + " ".join(f"w{i % 50}" for i in range(words)) + " ASSISTANT:"
        start = time.perf_counter()
        llm.generate([prompt], params)
        requests.append(f"{words} words {1e3 * (time.perf_counter() - start):.0f} ms")
    print(f"{torch.cuda.get_device_name()}: engine built in {built:.1f} s; "
          f"{allocated:.0f} MiB allocated, {reserved:.0f} MiB reserved after start; "
          f"requests of 16 tokens in order: " + ", ".join(requests))

if __name__ == "__main__":
    main()
