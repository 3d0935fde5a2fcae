"""The vision tower eager vs replayed from its CUDA graphs (``valora.engine.vision_graphs``):
host time until the call returns, synchronised wall time and the replay's error against the
eager tower, per image count, at the checkpoint's shapes (LLaVA-1.5-7B: CLIP-L/14 at 336 px).

    PYTHONPATH=$PWD python bench/model/vision_graphs_bench.py --model /tmp/model7b --out /tmp/v

``--model`` is a checkpoint directory (``bench/orchestrator/make_model_dir.py`` writes one with
dummy weights); ``--device cpu`` runs the same path eagerly (a smoke test, not a measurement).
Writes ``vision_graphs.jsonl`` under ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from valora.engine.vision_graphs import VisionGraphRunner, image_input_shape
from valora.models.loader import load_model


def _times(call: object, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median host ms (until return) and wall ms (synchronised) of ``call()``."""
    host, wall = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()  # type: ignore[operator]
        host.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - start)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sha", default="unknown")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, dtype=dtype, device=str(device), load_format="dummy",
                       attention_backend="triton" if device.type == "cuda" else "torch")
    counts = [int(n) for n in args.images.split(",")]
    runner = VisionGraphRunner(model, max(counts))
    runner.capture()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with torch.inference_mode():
        for count in counts:
            pixels = torch.randn(count, *image_input_shape(model), device=device, dtype=dtype)
            eager = _times(lambda p=pixels: model.encode_images(p), args.repeats, device)
            graph = _times(lambda p=pixels: runner.encode(p), args.repeats, device)
            ref = model.encode_images(pixels).float()
            error = float((runner.encode(pixels).float() - ref).norm() / ref.norm())
            rows.append({"gpu": gpu, "sha": args.sha, "images": count,
                         "replayed": runner.bucket_for(count) is not None and runner.use_graphs,
                         "eager_host_ms": eager[0], "eager_wall_ms": eager[1],
                         "graph_host_ms": graph[0], "graph_wall_ms": graph[1],
                         "rel_error": error})
            print(f"images {count}: eager host {eager[0]:7.2f} wall {eager[1]:7.2f} ms | "
                  f"graph host {graph[0]:7.2f} wall {graph[1]:7.2f} ms | error {error:.1e}")
    (args.out / "vision_graphs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
