"""CUDA graphs for the vision tower: ``encode_images`` replayed per image-count bucket.

The vision tower (CLIP + projector) takes images of one fixed size and runs ≈ 12 kernels per
encoder layer — about 300 launches for LLaVA-1.5's CLIP-L — on a few hundred GFLOP per image:
like the language model's eager steps, a host-bound forward. Its shapes depend only on how many
images a step encodes, so a graph per bucket of image counts (1, 2, 4, 8, capped at the most a
step can need) replays it with one launch.

Semantics: ``encode(pixels)`` equals ``model.encode_images(pixels)``. Images are encoded
independently (attention never crosses images), so a step of ``n`` images copies them into the
first ``n`` rows of a static input and replays the smallest bucket ``≥ n``; the padding rows hold
whatever the last step left there and their outputs are dropped. Beyond the largest bucket the
tower runs eagerly. The result is copied out of the graph's output (the image cache keeps it).

Safety: after capturing each bucket, its replay is compared with an eager forward of the same
random images; a bucket whose replay differs beyond the dtype's tolerance is not used (with a
warning), so a capture that recorded something host-dependent can cost speed, never outputs.
A capture that fails leaves the tower eager. With ``use_graphs=False`` (the CPU, tests) the same
static-buffer path runs eagerly.

Invariant: the tower's weights keep their storage after ``capture``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from valora.engine.cuda_graph import capped_buckets, smallest_bucket
from valora.errors import ValoraError
from valora.logger import get_logger

logger = get_logger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
"""Relative error (‖replay − eager‖ / ‖eager‖) a captured bucket may show in its self-check."""


def image_input_shape(model: Any) -> tuple[int, int, int]:
    """``(channels, size, size)`` of one image the model's vision tower takes."""
    embeddings = model.vision_tower.embeddings
    size = embeddings.image_size
    return int(embeddings.patch_embedding.weight.shape[1]), size, size


def image_buckets(max_images: int, buckets: Iterable[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets below ``max_images``, plus ``max_images`` itself (sorted)."""
    return capped_buckets(max_images, buckets, "max_images")


def images_per_step(model: Any, max_num_batched_tokens: int) -> int:
    """The most images one step may encode (0 without a vision tower): its prompt tokens hold
    at most ``budget // tokens per image`` whole images, plus one each side cut by the chunk
    boundaries — capped at 8 (more run eagerly)."""
    tower = getattr(model, "vision_tower", None)
    if tower is None:
        return 0
    embeddings = tower.embeddings
    per_image = max(1, (embeddings.image_size // embeddings.patch_embedding.patch_size) ** 2)
    return min(8, max_num_batched_tokens // per_image + 2)


class VisionGraphRunner:
    """Captures and replays ``model.encode_images`` per image-count bucket (module docstring)."""

    def __init__(self, model: Any, max_images: int, *, buckets: Iterable[int] = DEFAULT_BUCKETS,
                 use_graphs: bool | None = None) -> None:
        if getattr(model, "vision_tower", None) is None:
            raise ValoraError("the model has no vision tower")
        self.model = model
        self.device = torch.device(model.device)
        self.dtype = model.dtype
        self.buckets = image_buckets(max_images, buckets)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValoraError("CUDA graphs need a CUDA device")
        self._pixels = torch.zeros(self.buckets[-1], *image_input_shape(model), dtype=self.dtype,
                                   device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self.num_eager = 0

    @property
    def active_buckets(self) -> tuple[int, ...]:
        """The buckets served from a graph (all of them in eager mode, where none is captured)."""
        return self.buckets if not self.use_graphs else tuple(sorted(self._graphs))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket (largest first, one memory pool), each checked
        against an eager forward; a failing capture leaves that bucket eager."""
        if not self.use_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_reserved(self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        for size in reversed(self.buckets):
            static = self._pixels[:size]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.encode_images(static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    output = self.model.encode_images(static)
            except RuntimeError as exc:
                logger.warning("vision tower not capturable at %d image(s) (%s): eager", size,
                               exc)
                torch.cuda.synchronize(self.device)
                continue
            probe = torch.randn(static.shape, generator=generator, device=self.device)
            static.copy_(probe.to(self.dtype))
            graph.replay()
            replayed = output.float()
            expected = self.model.encode_images(static).float()
            error = float((replayed - expected).norm() / expected.norm().clamp_min(1e-12))
            if not error <= TOLERANCE.get(self.dtype, 2e-2):
                logger.warning("vision graph of %d image(s) differs from the eager tower "
                               "(relative error %.2e): not used", size, error)
                continue
            self._graphs[size], self._outputs[size] = graph, output
        torch.cuda.synchronize(self.device)
        logger.info("captured %d vision-tower graphs (images %s): %.1f MiB", len(self._graphs),
                    list(self.active_buckets),
                    (torch.cuda.memory_reserved(self.device) - before) / 2**20)

    def bucket_for(self, num_images: int) -> int | None:
        """The smallest bucket a graph serves that holds ``num_images``, or None."""
        return smallest_bucket(self.active_buckets, num_images)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``model.encode_images(pixels)`` (``[N, 3, S, S]`` on any device), from a graph when a
        bucket holds ``N``; a new tensor the caller may keep."""
        count = pixels.shape[0]
        size = self.bucket_for(count) if pixels.dim() == 4 else None
        if size is None or tuple(pixels.shape[1:]) != tuple(self._pixels.shape[1:]):
            self.num_eager += 1
            out: torch.Tensor = self.model.encode_images(pixels)
            return out
        self._pixels[:count].copy_(pixels, non_blocking=True)
        self.num_replays += 1
        if not self.use_graphs:
            return self.model.encode_images(self._pixels[:size])[:count].clone()
        self._graphs[size].replay()
        return self._outputs[size][:count].clone()


__all__ = ["VisionGraphRunner", "image_buckets", "image_input_shape", "images_per_step"]
