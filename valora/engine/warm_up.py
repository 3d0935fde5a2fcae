"""What the engine compiles at start, before graph capture, so that no step stalls on a compile
while serving: every LoRA kernel variant (``valora.ops.warmup``) and the skinny GEMM's binaries
for the base projections (``valora.ops.skinny_gemm``). Both only on CUDA with
``LoRAConfig.warm_up_lora_kernels`` set."""

from __future__ import annotations

import time
from typing import Any

import torch

from valora.config import EngineConfig
from valora.engine.mode_controller import merging_policy
from valora.layers.linear import FusedLinear
from valora.logger import get_logger
from valora.ops.skinny_gemm import warm_up_skinny_gemm
from valora.ops.warmup import WarmUpReport, warm_up_lora_kernels

logger = get_logger(__name__)


def warm_up_lora(
    config: EngineConfig, model: Any, device: torch.device, lora_backend: str, num_slots: int
) -> WarmUpReport | None:
    """Compile every LoRA kernel variant that steps of up to ``max_num_batched_tokens`` tokens
    over up to ``num_slots`` adapters can select (``valora.ops.warmup``), so none compiles in
    the middle of serving — the fused-correction forms too when ``fuse_correction`` is set and the
    mode policy can merge. Runs only with adapter slots, on CUDA, with the ``"triton"`` backend
    and ``warm_up_lora_kernels`` set; ``None`` when skipped. Call after ``model.init_lora``."""
    if not (
        num_slots
        and config.lora.warm_up_lora_kernels
        and device.type == "cuda"
        and lora_backend == "triton"
    ):
        return None
    report = warm_up_lora_kernels(
        [weights for weights, _ in model.lora_slot_map().values()],
        config.scheduler.max_num_batched_tokens,
        num_slots,
        device,
        lora_backend,
        # The fused forms serve only steps with a merged adapter: a policy that never merges
        # never runs them (on an H200 with a cold Triton cache they doubled the warm-up, 142 s).
        fused_correction=config.lora.fuse_correction and merging_policy(config),
        threads=config.lora.warm_up_threads,
    )
    logger.info(
        "compiled %d LoRA kernel variants in %.1f s (%d shrink + %d expand kernels, "
        "%d launches over %d layer shapes, %d threads)",
        report.kernels,
        report.seconds,
        report.shrink_kernels,
        report.expand_kernels,
        report.launches,
        report.layer_shapes,
        report.threads,
    )
    return report


def warm_up_base_gemm(config: EngineConfig, model: Any, device: torch.device) -> int:
    """Compile the skinny GEMM's binaries for the model's projections (``valora.ops.
    skinny_gemm``: decode-size base GEMMs on Hopper) on the warm-up threads, before graph capture
    would compile them one by one; with ``warm_up_lora_kernels`` set, on CUDA. Returns the
    launches (0 where no call takes the skinny GEMM)."""
    if device.type != "cuda" or not config.lora.warm_up_lora_kernels:
        return 0
    start = time.perf_counter()
    linears = [(m.weight, m.bias) for m in model.modules() if isinstance(m, FusedLinear)]
    launches = warm_up_skinny_gemm(linears, device, config.lora.warm_up_threads)
    if launches:
        logger.info("compiled %d skinny GEMM binaries in %.1f s", launches,
                    time.perf_counter() - start)
    return launches
