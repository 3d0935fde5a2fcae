"""Decode-step and image-prefill benchmark of valora's GPU path at LLaVA-1.5-7B shapes, with
HF transformers + PEFT on the same card in the same run (``shared/BENCHMARKS.md``).

valora is benched at the model level: dummy weights (``load_format="dummy"``), the ``"triton"``
attention backend, the Triton LoRA backend, and decode steps replayed from ``CudaGraphRunner``
graphs over our own ``ForwardBatch`` es (the engine's model runner does not call the graph
runner yet). Each row: median/min/max ms per step (CUDA events, after warm-up), the floor (bytes
that must move over the measured copy bandwidth) and the ratio.

``--layers`` picks the per-layer op implementations to bench (default both): ``stock`` rows run
valora's PyTorch twins (``VALORA_FUSED_LAYERS=0``), ``fused`` rows the in-package Triton kernels
(residual add + RMSNorm, q/k rotary in one launch, SiLU-and-mul; valora's default on CUDA). The
fused rows are preceded by a kernel-vs-twin check at 7B shapes; a ``kernels`` section counts the
CUDA kernels of one eager decode step per decoder layer in each mode. The no-graph point and the
prefill run with the last mode listed. ``serial`` / ``overlap`` rows are ``fused`` with the LoRA
deltas never / always (≤ 256 tokens) on the side stream (``valora/layers/lora_overlap.py``);
``fused`` and ``stock`` overlap as the engine does by default (``LoRAConfig.overlap_max_tokens``);
``overlap_o_down`` also overlaps the o / down projections' deltas at every size (session 12:
no gain). Scenarios: ``base``, one rank-16 adapter, 8 rank-16 adapters, 32 adapters of ranks
8–64 (unmerged), and ``merged_r16`` (session 16): the one-adapter scenario's adapter folded into
the weights by the engine's ``WeightSwitcher`` and every row on the base graph — the row the
issue's "(d) merged adapter" asks for, beside HF + PEFT's ``merged_r16``; its
``merged_vs_unmerged_rel_diff`` compares its output with the unmerged one's.

    python bench/model/bench_decode.py --out DIR [--sha SHA] [--layers stock,fused] [--skip-hf]
        [--tiny CKPT_DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl
from fused_layers import (
    LABELS,
    LAYERS_HELP,
    check_against_stock,
    kernels_per_step,
    label_settings,
)
from summary import kernel_table, write_summary

import valora.layers.attention_triton  # noqa: F401  (registers "triton")
from valora.config import LoRAConfig
from valora.engine.cuda_graph import CudaGraphRunner, few_adapter_captures
from valora.engine.piecewise_graphs import capture_piecewise_graphs
from valora.layers.fused_select import fused_layers, set_fused_kv_write
from valora.models.loader import load_model
from valora.orchestrator.merge import WeightSwitcher

CONFIG_DIR = Path(__file__).resolve().parent / "llava-1.5-7b"
NUM_SLOTS, MAX_RANK, CONTEXT = 32, 64, 600


class Recorder:
    """Appends JSONL rows (with the setup fields) to a file and keeps them for the summary."""

    def __init__(self, path: Path, common: dict[str, Any]) -> None:
        self.path, self.common = path, common
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def emit(self, row: dict[str, Any]) -> None:
        full = {**self.common, **row}
        self.rows.append(full)
        with self.path.open("a") as f:
            f.write(json.dumps(full) + "\n")
        print(json.dumps(row), flush=True)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int,
            warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return samples
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured on random data."""
    if device.type != "cuda":
        return {"copy_bytes_per_s": 1e10, "bf16_flops_per_s": 1e11}
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = statistics.median(time_ms(lambda: dst.copy_(src), device, 10))
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm = statistics.median(time_ms(lambda: a @ b, device, 10))
    return {"copy_bytes_per_s": 2 * (2 << 30) / (copy * 1e-3),
            "bf16_flops_per_s": 2 * 8192**3 / (mm * 1e-3)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_decode(model: Any, pool: wl.KVPool, ranks: list[int], batches: list[int],
                 ceil: dict[str, float], rec: Recorder, label: str, repeats: int) -> None:
    """The decode grid with the per-layer ops of ``label`` (captured and replayed in that mode)."""
    with label_settings(model, label):
        _bench_decode(model, pool, ranks, batches, ceil, rec, label, repeats)


def _bench_decode(model: Any, pool: wl.KVPool, ranks: list[int], batches: list[int],
                  ceil: dict[str, float], rec: Recorder, label: str, repeats: int) -> None:
    device = model.device
    few_buckets, few_max = few_adapter_captures(  # as the engine
        LoRAConfig() if LABELS[label].few_adapters else LoRAConfig(few_adapter_max=0), device)
    runner = CudaGraphRunner(model, max(batches), max_context=4096, page_size=wl.PAGE_SIZE,
                             num_lora_slots=NUM_SLOTS, variants=("base", "lora"),
                             buckets=batches, few_adapter_buckets=few_buckets,
                             few_adapter_max=few_max)
    begin = time.perf_counter()
    runner.capture()
    rec.emit({"section": "capture", "label": label, "seconds": time.perf_counter() - begin})
    weights = wl.decoder_bytes(model)
    switcher = WeightSwitcher(model.lora_base_weights(), model.lora_slot_map())
    for batch in batches:
        pool.reset()
        contexts = [CONTEXT - 10 + (7 * i) % 21 for i in range(batch)]
        hidden_of: dict[str, torch.Tensor] = {}
        for scenario in (*wl.SCENARIOS, wl.MERGED):
            merged = scenario == wl.MERGED
            if merged:  # the base graph over weights with one_adapter_r16's adapter folded in
                switcher.merge(wl.MERGED_SLOT, scenario)
            try:
                _bench_scenario(model, runner, pool, contexts, ranks, ceil, rec, label, repeats,
                                weights, scenario, batch, hidden_of)
            finally:
                if merged:
                    switcher.unmerge()


def _bench_scenario(model: Any, runner: CudaGraphRunner, pool: wl.KVPool, contexts: list[int],
                    ranks: list[int], ceil: dict[str, float], rec: Recorder, label: str,
                    repeats: int, weights: int, scenario: str, batch: int,
                    hidden_of: dict[str, torch.Tensor]) -> None:
    """One decode row: the graph's output checked against an eager forward, then timed.
    ``lora_vs_base_rel_diff``: against the base scenario's output; the merged scenario also
    against ``one_adapter_r16``'s (the same adapter unmerged: bf16 rounding apart, equal)."""
    device = model.device
    slots = wl.scenario_slots(scenario, batch)
    step = wl.decode_step(model, pool, contexts, slots, NUM_SLOTS, "triton")
    pool.reset()
    fb = step.batch
    assert runner.can_run(fb), f"graph runner refused {scenario} batch {batch}"
    with torch.inference_mode():
        eager = model.forward(fb)
        graphed = runner.run(fb).clone()
    error = rel_err(graphed.float(), eager.float())
    hidden_of[scenario] = graphed.float()
    base_hidden = hidden_of.get("base")
    delta = 0.0 if base_hidden is None or scenario == "base" else rel_err(graphed.float(),
                                                                           base_hidden)
    extra = ({"merged_vs_unmerged_rel_diff": rel_err(graphed.float(),
                                                     hidden_of["one_adapter_r16"])}
             if scenario == wl.MERGED and "one_adapter_r16" in hidden_of else {})

    def run_step(fb: Any = fb) -> None:
        with torch.inference_mode():
            model.compute_logits(runner.run(fb))

    samples = time_ms(run_step, device, repeats)
    nbytes = (weights + wl.kv_bytes(model, step.context_tokens)
              + wl.adapter_bytes(model, ranks, slots))
    floor_ms = nbytes / ceil["copy_bytes_per_s"] * 1e3
    median = statistics.median(samples)
    rec.emit({"section": "decode", "label": label, "scenario": scenario, "batch": batch,
              "context_mean": step.context_tokens / batch, "median_ms": median,
              "min_ms": min(samples), "max_ms": max(samples), "floor_ms": floor_ms,
              "over_floor": median / floor_ms, "bytes": nbytes,
              "distinct_adapters": len({s for s in slots if s >= 0}),
              "graph_vs_eager_rel_err": error, "lora_vs_base_rel_diff": delta, **extra})


def bench_eager_decode(model: Any, pool: wl.KVPool, batch: int, ceil: dict[str, float],
                       rec: Recorder, repeats: int, layers: str) -> None:
    """One reference point without graphs: what launch overhead costs."""
    pool.reset()
    step = wl.decode_step(model, pool, [CONTEXT] * batch, [-1] * batch, NUM_SLOTS, "triton")

    def run() -> None:
        with torch.inference_mode():
            model.compute_logits(model.forward(step.batch))

    with fused_layers(LABELS[layers].mode):
        samples = time_ms(run, model.device, repeats)
    rec.emit({"section": "decode", "label": "eager_no_graph", "scenario": "base", "batch": batch,
              "layers": layers, "median_ms": statistics.median(samples),
              "min_ms": min(samples), "max_ms": max(samples)})


def count_kernels(model: Any, pool: wl.KVPool, batch: int, labels: list[str],
                  rec: Recorder) -> None:
    """CUDA kernels of one eager base decode step (incl. LM head) per mode, and per layer."""
    pool.reset()
    step = wl.decode_step(model, pool, [CONTEXT] * batch, [-1] * batch, NUM_SLOTS, "triton")

    def run() -> None:
        with torch.inference_mode():
            model.compute_logits(model.forward(step.batch))

    for label in labels:
        set_fused_kv_write(LABELS[label].kv_write)
        try:
            count = kernels_per_step(run, LABELS[label].mode)
        finally:
            set_fused_kv_write(None)
        rec.emit({"section": "kernels", "label": label, "batch": batch,
                  "kernels_per_step": count, "per_layer": count / model.spec.num_layers})


def bench_prefill(model: Any, pool: wl.KVPool, prompts: int, ceil: dict[str, float],
                  rec: Recorder, repeats: int, layers: str) -> None:
    """Image prompts: vision tower + projector for ``prompts`` images, then the decoder prefill
    of ``prompts`` × 600 tokens (576 image rows each); floor = flops / measured matmul rate.
    Timed eagerly (``model.forward``) and, labelled ``+piecewise``, through piecewise graphs
    captured for exactly that token count (what the engine replays for such a step)."""
    spec = model.spec
    size = spec.image_size
    pixels = torch.randn(prompts, 3, size, size, device=model.device, dtype=model.dtype)
    pool.reset()
    with torch.inference_mode():
        rows = model.encode_images(pixels)
    batch = wl.prefill_step(model, pool, prompts, CONTEXT, rows)

    def runner(forward: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                embeds = model.encode_images(pixels)
                batch.image_embeds = embeds.reshape(-1, embeds.shape[-1])
                model.compute_logits(forward(batch).index_select(0, batch.logits_indices))

        return run

    with fused_layers(LABELS[layers].mode):
        samples = time_ms(runner(model.forward), model.device, repeats, warmup=2)
    tokens = prompts * CONTEXT
    vision_params = sum(p.numel() for p in model.vision_tower.parameters())
    decoder_params = wl.decoder_bytes(model) // 2
    flops = 2 * tokens * decoder_params + 2 * prompts * (spec.num_image_tokens + 1) * vision_params
    flops += 2 * 2 * spec.num_layers * spec.hidden_size * prompts * CONTEXT * CONTEXT // 2
    floor_ms = flops / ceil["bf16_flops_per_s"] * 1e3
    pieces = capture_piecewise_graphs(model, tokens, num_lora_slots=0, variants=("base",),
                                      buckets=(tokens,))
    runs = [(layers, samples)]
    if pieces is not None:  # the engine's path for such steps (valora.engine.piecewise_graphs)
        with fused_layers(LABELS[layers].mode):
            runs.append((f"{layers}+piecewise", time_ms(runner(pieces.run), model.device,
                                                        repeats, warmup=2)))
        del pieces
    for label, times in runs:
        median = statistics.median(times)
        rec.emit({"section": "prefill", "label": label, "prompts": prompts, "tokens": tokens,
                  "median_ms": median, "min_ms": min(times), "max_ms": max(times),
                  "tokens_per_s": tokens / (median * 1e-3), "floor_ms": floor_ms,
                  "over_floor": median / floor_ms, "flops": flops})


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sha", default="unknown")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--hf-batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--layers", default="stock,fused", help=LAYERS_HELP)
    parser.add_argument("--skip-fused", action="store_true", help="same as --layers stock")
    parser.add_argument("--tiny", type=Path, help="a tiny checkpoint: exercise the script only")
    parser.add_argument("--config", type=Path, default=CONFIG_DIR,
                        help="directory of the config.json to bench (default LLaVA-1.5-7B; "
                             "bench/model/llava-1.5-13b for 13B shapes)")
    return parser.parse_args()


def main() -> None:
    args = parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config_dir = args.tiny or args.config
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    rec = Recorder(args.out / "decode.jsonl", {"device": name, "git_sha": args.sha,
                                               "model": f"{args.config.name}-dummy" if not args.tiny
                                               else "tiny", "dtype": str(dtype)})
    ceil = ceilings(device)
    rec.emit({"section": "ceilings", **ceil})
    run_valora(config_dir, device, dtype, batches, ceil, rec, args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_hf:
        from hf_peer import run_peer

        spec = {"vocab_size": 32064, "image_token_id": 32000, "image_size": 336,
                "num_image_tokens": 576}
        if args.tiny:
            cfg = json.loads((config_dir / "config.json").read_text())
            spec = {"vocab_size": cfg["text_config"]["vocab_size"],
                    "image_token_id": cfg.get("image_token_index", cfg.get("image_token_id")),
                    "image_size": cfg["vision_config"]["image_size"],
                    "num_image_tokens": (cfg["vision_config"]["image_size"]
                                         // cfg["vision_config"]["patch_size"]) ** 2}
        run_section("hf_peer", lambda: run_peer(
            config_dir, device, [int(b) for b in args.hf_batches.split(",")], CONTEXT,
            max(3, args.repeats // 4), spec, lambda row: rec.emit({"section": "peer", **row})),
            rec)
    write_summary(rec.rows, args.out / "summary.md")
    print(kernel_table(rec.rows, LABELS))
    print((args.out / "summary.md").read_text())


def run_valora(config_dir: Path, device: torch.device, dtype: torch.dtype, batches: list[int],
               ceil: dict[str, float], rec: Recorder, args: argparse.Namespace) -> None:
    """Every valora figure; the model and its KV pool are freed when this returns."""
    model = load_model(str(config_dir), dtype=dtype, device=device, load_format="dummy",
                       attention_backend="triton")
    model.init_lora(NUM_SLOTS, MAX_RANK)
    ranks = wl.fill_adapter_slots(model, NUM_SLOTS, seed=1)
    pages_per_seq = -(-(CONTEXT + 11) // wl.PAGE_SIZE)
    pool = wl.KVPool(model, max(batches) * pages_per_seq + 8 * pages_per_seq + 1, seed=2)
    small = min(32, max(batches))
    labels = ["stock"] if args.skip_fused else [x for x in args.layers.split(",") if x]
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise SystemExit(f"--layers: unknown {sorted(unknown)}; known: {sorted(LABELS)}")
    last = labels[-1]
    sections: list[tuple[str, Callable[[], None]]] = []
    for label in labels:
        sections.append((f"decode_{label}", lambda label=label: decode_section(
            model, pool, ranks, batches, ceil, rec, label, args.repeats)))
    if device.type == "cuda":
        sections.append(("kernels", lambda: count_kernels(model, pool, small, labels, rec)))
    sections += [
        ("decode_eager", lambda: bench_eager_decode(model, pool, small, ceil, rec, args.repeats,
                                                    last)),
        ("prefill", lambda: bench_prefill(model, pool, 4, ceil, rec, max(3, args.repeats // 4),
                                          last)),
    ]
    for label, section in sections:
        run_section(label, section, rec)


def decode_section(model: Any, pool: wl.KVPool, ranks: list[int], batches: list[int],
                   ceil: dict[str, float], rec: Recorder, label: str, repeats: int) -> None:
    """The decode grid in one mode; the fused grid only after its kernels pass the check."""
    if label == "fused":
        errors = check_against_stock(model.device, model.dtype)
        rec.emit({"section": "fused_check", **errors})
        if max(errors.values()) > 1e-2:
            raise RuntimeError(f"fused kernels disagree with the stock layers: {errors}")
    if device_is_cuda(model):
        torch.cuda.empty_cache()
    bench_decode(model, pool, ranks, batches, ceil, rec, label, repeats)


def device_is_cuda(model: Any) -> bool:
    return bool(model.device.type == "cuda")


def run_section(label: str, section: Callable[[], None], rec: Recorder) -> None:
    try:
        section()
    except Exception as exc:  # a failed section is reported, the others still run
        rec.emit({"section": "error", "label": label, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
