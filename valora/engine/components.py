"""Build an engine's parts from its config: model, tokenizer, processor, caches, scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from valora.config import EngineConfig
from valora.engine.memory_plan import MemoryPlan, plan_gpu_memory
from valora.engine.vision_graphs import images_per_step
from valora.errors import ModelLoadError
from valora.logger import get_logger

logger = get_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_model_path(model: str) -> Path:
    """``"default"`` → the embedded model (or, where it is not shipped, a tiny random model built on
    first use under ``~/.cache/valora``); anything else must be a local checkpoint directory."""
    if model == "default":
        try:
            from valora.assets import default_model_path

            path = default_model_path()
            if (path / "config.json").exists():
                return path
        except ImportError:
            pass
        return demo_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{model!r} is not a local checkpoint directory with a config.json (valora never downloads weights)"
        )
    return path


def demo_model_path() -> Path:
    """A tiny random LLaVA checkpoint, built once (used only where no default model is shipped)."""
    from valora.testing.checkpoints import build_tiny_llava

    path = Path.home() / ".cache" / "valora" / "demo-tiny-llava"
    if not (path / "config.json").exists():
        logger.info("building a tiny random demo model at %s", path)
        build_tiny_llava(path)
    return path


@dataclass
class KVSizing:
    """KV pool size; ``plan`` is the GPU memory plan it came from (``None`` on the CPU or when
    ``num_pages`` was given explicitly)."""

    num_pages: int
    bytes_per_page: int
    plan: MemoryPlan | None = None


def size_kv_cache(
    config: EngineConfig,
    model: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    lora_backend: str = "auto",
    graph_batch: int = 0,
    pristine_bytes: int = 0,
) -> KVSizing:
    """Pages for the KV pool: explicit ``num_pages``, else a byte budget (CPU) or, on CUDA, what
    ``plan_gpu_memory`` leaves of ``memory_fraction`` after weights, adapter slots, the profiled
    activation peak and (``graph_batch`` > 0) the decode-graph reserve. Call it after
    ``model.init_lora`` (and after a merging mode policy's pristine copy exists:
    ``pristine_bytes`` names it in the plan) and before the KV cache is allocated."""
    spec = model.spec
    element = torch.tensor([], dtype=dtype).element_size()
    per_page = (
        2 * spec.num_layers * config.cache.page_size * spec.num_kv_heads * spec.head_dim * element
    )
    if config.cache.num_pages is not None:
        return KVSizing(config.cache.num_pages, per_page)
    if device.type == "cuda":
        plan = plan_gpu_memory(
            model,
            page_size=config.cache.page_size,
            memory_fraction=config.cache.memory_fraction,
            max_num_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs,
            graph_batch=graph_batch,
            lora_backend=lora_backend,
            pristine_bytes=pristine_bytes,
            vision_images=images_per_step(model, config.scheduler.max_num_batched_tokens)
            if graph_batch else 0,
            piecewise_tokens=config.scheduler.max_num_batched_tokens
            if graph_batch and config.model.prefill_graphs else 0,
        )
        return KVSizing(plan.num_pages, plan.bytes_per_page, plan)
    num_pages = max(config.cache.cpu_cache_bytes // per_page, 2)
    return KVSizing(int(num_pages), per_page)


def use_cuda_graphs(
    config: EngineConfig, device: torch.device, attention_backend: str, lora_backend: str
) -> bool:
    """Decode steps replay CUDA graphs on CUDA with the ``"triton"`` attention backend (the
    PyTorch one is not capturable) and, with LoRA enabled, the ``"triton"`` LoRA backend (the
    graphs launch it), unless ``enforce_eager`` is set."""
    lora_ok = not config.lora.enable_lora or lora_backend == "triton"
    return (
        device.type == "cuda"
        and attention_backend == "triton"
        and lora_ok
        and not config.model.enforce_eager
    )


def graph_variants(config: EngineConfig, num_lora_slots: int) -> tuple[str, ...]:
    """Graph variants to capture: ``base`` always; ``lora`` with adapter slots; ``mixed`` too
    when the mode policy can merge an adapter (its steps carry a correction launch)."""
    if num_lora_slots == 0:
        return ("base",)
    if config.orchestrator.mode_policy == "unmerged-fcfs":
        return ("base", "lora")
    return ("base", "lora", "mixed")


def attention_backend_for(name: str, device: torch.device) -> str:
    """``"auto"`` → the Triton kernels on CUDA (when Triton is installed), PyTorch elsewhere."""
    if name != "auto":
        return name
    from valora.layers.attention import available_attention_backends

    return (
        "triton"
        if device.type == "cuda" and "triton" in available_attention_backends()
        else "torch"
    )
