"""Host time an engine step spends outside the model's forward (scheduling, batch building,
sampling, detokenising, building outputs) — work the GPU waits for, since a step's host work and
the next step's device work do not overlap. Runs on any device; on the CPU with the default tiny
model the forward is cheap, so what is left is the engine's own Python.

Per configuration (``--rows`` concurrent requests decoding ``--tokens`` tokens each, greedy,
EOS ignored), the median over ``--repeats`` runs of ``(wall − forward) / steps``, with the
detokeniser's direct Rust-tokenizer path and, as a control, with ``tokenizer.decode``.
``--async-outputs``: with ``SchedulerConfig.async_output_processing`` on, and how much of that
host time is the deferred half, which overlaps the next step's device work on a GPU (on the CPU
nothing overlaps: the forward is synchronous).

    python bench/model/engine_host_overhead.py [--rows 16 64] [--tokens 48] [--repeats 5]
        [--async-outputs]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from valora import LLM, SamplingParams
from valora.engine import detokenizer


def measure(llm: LLM, rows: int, tokens: int, words: int = 0) -> tuple[float, int, float]:
    """``(host ms per step outside the forward, steps, of it ms per step in the deferred half
    of async output processing)`` of one run."""
    runner = llm.engine.parts.runner
    engine = llm.engine
    spent = {"forward": 0.0, "steps": 0, "deferred": 0.0}
    original = runner._forward
    run_deferred = engine._run_deferred

    def timed_deferred() -> Any:
        start = time.perf_counter()
        outputs = run_deferred()
        spent["deferred"] += time.perf_counter() - start
        return outputs

    engine._run_deferred = timed_deferred  # type: ignore[method-assign]

    def timed(*args: Any, **kwargs: Any) -> Any:  # the runner's _forward, whatever it takes
        start = time.perf_counter()
        result = original(*args, **kwargs)
        spent["forward"] += time.perf_counter() - start
        spent["steps"] += 1
        return result

    runner._forward = timed
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        filler = " ".join(f"w{j % 50}" for j in range(words))  # a long prompt, as an image's
        prompts = [f"USER: {filler} question number {i} about the picture ASSISTANT:"
                   for i in range(rows)]
        start = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - start
    finally:
        runner._forward = original
        del engine._run_deferred
    steps = int(spent["steps"])
    if steps == 0:  # a step that raised is failed by the engine, not raised: say so here
        raise RuntimeError("no forward ran: the engine failed every step (see its log)")
    return 1e3 * (wall - spent["forward"]) / steps, steps, 1e3 * spent["deferred"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, nargs="+", default=[0, 150],
                        help="filler words per prompt (150: ≈ 430 tokens of the 512 the default "
                             "model holds)")
    parser.add_argument("--async-outputs", action="store_true",
                        help="async output processing on; report its deferred half")
    args = parser.parse_args()
    llm = LLM(model="default", dtype="float32", device="cpu", num_pages=4096, page_size=16,
              enable_prefix_caching=False, max_num_seqs=max(args.rows),
              async_output_processing=args.async_outputs)
    measure(llm, 4, 8)  # warm-up
    fast = getattr(detokenizer, "fast_decoder", None)  # None: a tree from before it existed
    print("rows | prompt words | decode path | host ms per step outside the forward "
          "(median, min–max) | steps" + (" | of it deferred (median)" if args.async_outputs
                                         else ""))
    for rows, words in ((r, w) for r in args.rows for w in args.prompt_words):
        paths = (("direct (default)", fast), ("tokenizer.decode", _generic)) if fast else (
            ("tokenizer.decode", None),)
        for label, choice in paths:
            if choice is not None:
                detokenizer.fast_decoder = choice  # read by each new request's detokenizer
            try:
                runs = [measure(llm, rows, args.tokens, words) for _ in range(args.repeats)]
            finally:
                if fast is not None:
                    detokenizer.fast_decoder = fast
            ms = [r[0] for r in runs]
            deferred = (f" | {statistics.median(r[2] for r in runs):6.2f}"
                        if args.async_outputs else "")
            print(f"{rows:4d} | {words:4d} | {label:16s} | {statistics.median(ms):6.2f} "
                  f"({min(ms):.2f}–{max(ms):.2f}) | {runs[0][1]}{deferred}", flush=True)


def _generic(tokenizer: Any, skip: bool) -> Any:
    def generic(token_ids: list[int]) -> str:
        text: str = tokenizer.decode(token_ids, skip_special_tokens=skip)
        return text

    return generic


if __name__ == "__main__":
    main()
