"""Engine configuration: frozen dataclasses validated on construction with actionable messages.

The CLI (``valora generate`` / ``valora serve``) derives its flags from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from valora.errors import InvalidRequestError

Dtype = Literal["float32", "bfloat16", "float16", "auto"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to serve and how to load it.

    ``model``: a local Hugging Face checkpoint directory, or ``"default"`` for the embedded model.
    ``dtype``: ``"auto"`` (bfloat16 on CUDA, float32 on the CPU), ``"float32"``, ``"bfloat16"`` or
    ``"float16"``. ``seed``: seeds the dummy weights and the sampling of requests without a seed of
    their own. ``load_format``: ``"safetensors"`` reads weights; ``"dummy"`` fills random weights
    for any config (benchmarks at real shapes). ``max_model_len``: ``None`` = the config's own limit.
    ``attention_backend``: ``"auto"`` (Triton kernels on CUDA, plain PyTorch elsewhere),
    ``"torch"`` or ``"triton"``. ``enforce_eager``: never capture CUDA graphs for decode steps
    (they are captured on CUDA with the ``"triton"`` attention backend otherwise).
    ``prefill_graphs``: where decode graphs are captured, also capture every other step's
    row-wise work between attention calls per token-count bucket (piecewise graphs,
    ``valora.engine.piecewise_graphs``): prefill and mixed steps replay ``layers + 1`` graphs
    around eager attention instead of launching every kernel from Python.
    """

    model: str = "default"
    dtype: Dtype = "auto"
    load_format: Literal["safetensors", "dummy"] = "safetensors"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"
    enforce_eager: bool = False
    prefill_graphs: bool = True

    def __post_init__(self) -> None:
        _require(
            self.dtype in ("float32", "bfloat16", "float16", "auto"),
            f"dtype must be one of float32/bfloat16/float16/auto, got {self.dtype!r}",
        )
        _require(
            self.load_format in ("safetensors", "dummy"),
            f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}",
        )
        _require(
            self.max_model_len is None or self.max_model_len > 0, "max_model_len must be positive"
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. ``num_pages=None`` sizes the pool from ``memory_fraction`` (GPU) or
    ``cpu_cache_bytes`` (CPU).

    ``page_size``: tokens per KV page. ``num_pages``: KV pages (``None``: sized from memory).
    ``memory_fraction``: share of the GPU's memory the engine may use in all (weights, adapter
    slots, graphs, activations; the KV cache gets the rest, ``valora.engine.memory_plan``).
    ``cpu_cache_bytes``: KV cache bytes on the CPU. ``enable_prefix_caching``: reuse the KV pages
    of prompt prefixes already computed (keyed by tokens, adapter and images).
    """

    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.85
    cpu_cache_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(
            self.page_size > 0 and (self.page_size & (self.page_size - 1)) == 0,
            f"page_size must be a positive power of two, got {self.page_size}",
        )
        _require(self.num_pages is None or self.num_pages > 0, "num_pages must be positive")
        _require(0.0 < self.memory_fraction <= 1.0, "memory_fraction must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching under a token budget.

    ``max_num_batched_tokens``: tokens per step (decodes count one each). ``max_num_seqs``:
    sequences per step. ``max_waiting``: bound of the waiting queue; beyond it requests are
    rejected with ``QueueFullError``. ``chunked_prefill``: split long prompts across steps.
    ``policy``: name of the ordering policy in the policy registry.
    ``async_output_processing``: process a step's sampled tokens in two halves — the token-level
    stop checks (EOS, stop token ids, lengths) at once, the detokenisation, stop strings and
    output objects while the *next* step runs on the device (``LLMEngine``: "Asynchronous output
    processing"), except for a request's first token and a token that ends it by a token-level
    check. Outputs in between reach callers one step later and a request stopped by a stop
    string runs one step more (that token is discarded); tokens, texts and finish reasons are
    those of the synchronous order. Off by default: on an H200 at LLaVA-1.5-7B shapes engine
    steps were 4.7–11.3 % shorter with it (dummy weights, 32 / 64 greedy requests of 128 tokens,
    ``bench/results/model/h200-async-known-d1a2d47/``); the serving A/Bs
    (``bench/orchestrator/piecewise_ab.sh``, 6 workload points, ``bench/results/serve/
    async-ab-h200-*``, five runs) found no consistent latency difference — and, run in both
    orders on the same code (session 12), the engine that ran first lost at every point either
    way (``docs/gpu.md``), so the order biased them all. The script now warms an engine first; the
    default stays the simpler synchronous order until such an A/B decides.
    ``async_scheduling``: schedule and launch step N+1 before reading step N's tokens (what vLLM
    calls asynchronous scheduling; ``LLMEngine``: "Asynchronous scheduling"): the host's
    scheduling, batch building and launch overlap the device's step N, a decode row's input id
    is taken on the device from step N's sampled tokens, and step N's outputs come with the call
    that launched N+1. Tokens, texts and finish reasons equal the synchronous order's; a request
    that ends at step N by EOS, a stop id or a stop string has computed one row more in N+1
    (dropped). ``None`` (the default, ``auto`` on the command line): on for an engine on CUDA
    unless ``async_output_processing`` is on, off on the CPU (``resolved_async_scheduling``).
    On an H200 at LLaVA-1.5-7B shapes it made engine steps 1.22–1.33× shorter (dummy weights,
    32 / 64 greedy requests of 128 tokens, base and 8 adapters,
    ``bench/results/model/h200-async-scheduling-5746017/``); on the CPU nothing overlaps and its
    bookkeeping cost up to 4 % (``bench/results/model/async-scheduling-cpu-7ee8347/``). Not with
    ``async_output_processing`` (it overlaps the same host work).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_waiting: int = 4096
    chunked_prefill: bool = True
    policy: str = "fcfs"
    async_output_processing: bool = False
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _require(not (self.async_scheduling is True and self.async_output_processing),
                 "async_scheduling and async_output_processing overlap the same host work: "
                 "turn on one of them")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive")
        _require(self.max_num_seqs > 0, "max_num_seqs must be positive")
        _require(self.max_waiting > 0, "max_waiting must be positive")

    def resolved_async_scheduling(self, device_type: str) -> bool:
        """Whether an engine on a ``device_type`` (``"cuda"``, ``"cpu"``) schedules
        asynchronously: ``async_scheduling`` when set, else on CUDA only and not beside
        ``async_output_processing``."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return device_type == "cuda" and not self.async_output_processing


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter residency and the batched LoRA backend.

    ``enable_lora``: allocate adapter slots (off: the base model only). ``max_loras``: resident
    slots usable in one step. ``max_cpu_loras``: adapters kept decoded in host memory (LRU
    beyond). ``max_lora_rank``: slot storage rank; larger adapters are rejected.
    ``lora_backend``: ``"auto"`` (Triton on CUDA, reference on CPU), ``"reference"`` or ``"triton"``.
    ``overlap_max_tokens``: on CUDA, steps of at most this many tokens compute each layer's LoRA
    delta on a side stream beside the base GEMM (``valora.layers.lora_overlap``); ``0`` = never.
    Measured on an H200 at 7B shapes (decode graph replays, ``bench/results/model/
    h200-overlap-3cb0ce6/``, overlapped step / serial step): 0.94–0.96× at batch 24–32 with one
    or 8 adapters, 0.995–0.998× with 32 adapters of ranks 8–64, 0.97–1.01× at 48, 1.00–1.04× (a
    loss) at 64–128 — hence 32 (it was 16 until session 11; at batch 1–8 it hides most of the
    per-op fixed latency).
    ``warm_up_lora_kernels``: on CUDA with the Triton backend, compile at engine start every LoRA
    kernel variant a step of up to ``max_num_batched_tokens`` tokens can select
    (``valora.ops.warmup``), so that no prefill stalls on a compile while serving — and the base
    projections' skinny GEMM binaries (``valora.ops.skinny_gemm``, decode sizes on Hopper).
    ``warm_up_threads``: threads compiling them (0: one per CPU core, at most 16; 1: in order).
    ``fuse_correction``: in mixed mode, compute the rows' own adapters and the merged adapter's
    correction in one LoRA op (one shrink + one expand launch per layer, ``valora.ops.lora``)
    instead of two, in eager steps and decode graphs alike (the warm-up compiles the fused forms
    too when the mode policy can merge; engines that never merge never run them).
    On by default since its first GPU run (H200, 7B shapes,
    ``bench/results/model/h200-fused-correction-b35c4d5``): 0.97–1.63× the GPU speed of the two-op
    form under CUDA graphs (faster at 19 of 20 layer/step points), about half its host time, the
    same error against the fp32 twin.
    ``few_adapter_max``: decode steps with at most this many distinct adapters replay, at the
    buckets of ``few_adapter_buckets``, a second capture of their LoRA graph whose base
    projections run on cuBLAS instead of the skinny GEMM (only where the skinny GEMM is on);
    ``0`` = never. ``few_adapter_buckets``: those decode-graph buckets, comma-separated. Measured
    on an H200 at 7B shapes (``bench/results/model/h200-skinny-ab-de0d074/``): with one or 8
    adapters at 8–16 rows a step with the base GEMM on cuBLAS took up to 6 % less than with the
    skinny GEMM (one adapter at 16 rows; 8 adapters at 8 rows: even), the LoRA op beside it
    having SMs left (the skinny GEMM's one wave of programs leaves the side stream none); with 32
    adapters 2–7 % more — hence 8 adapters at buckets 8 and 16 (the skinny GEMM won elsewhere).
    """

    enable_lora: bool = True
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    lora_backend: str = "auto"
    overlap_max_tokens: int = 32
    warm_up_lora_kernels: bool = True
    warm_up_threads: int = 0
    fuse_correction: bool = True
    few_adapter_max: int = 8
    few_adapter_buckets: str = "8,16"

    def __post_init__(self) -> None:
        _require(self.max_loras > 0, "max_loras must be positive")
        _require(self.max_cpu_loras >= self.max_loras, "max_cpu_loras must be >= max_loras")
        _require(self.max_lora_rank > 0, "max_lora_rank must be positive")
        _require(self.overlap_max_tokens >= 0, "overlap_max_tokens must be >= 0")
        _require(self.warm_up_threads >= 0, "warm_up_threads must be >= 0 (0: one per core)")
        _require(self.few_adapter_max >= 0, "few_adapter_max must be >= 0 (0: never)")
        self.few_adapter_bucket_sizes()  # validates

    def few_adapter_bucket_sizes(self) -> tuple[int, ...]:
        """``few_adapter_buckets`` as sorted bucket sizes (``InvalidRequestError`` for a malformed
        one)."""
        parts = [p.strip() for p in self.few_adapter_buckets.split(",") if p.strip()]
        _require(all(p.isdigit() and int(p) > 0 for p in parts),
                 f"few_adapter_buckets must be positive integers, comma-separated: "
                 f"{self.few_adapter_buckets!r}")
        return tuple(sorted({int(p) for p in parts}))


@dataclass(frozen=True)
class OrchestratorConfig:
    """How LoRA is applied each step (see ``docs/modes.md``).

    ``mode_policy``: ``"unmerged-fcfs"`` (default: every row unmerged, bit-stable outputs),
    ``"valora"`` (cost-model choice among unmerged / merged / mixed), ``"dlora"``,
    ``"merged-only"``. ``starvation_s``: no request waits longer than this behind others.
    ``restore``: how unmerging restores the base weights (``"pristine"`` copy: exact, costs a copy
    of every adapted weight; ``"resync"``: subtract, re-copy periodically). ``cost_model_path``:
    a JSON of profiled cost models keyed by device name (``None``: the analytic prior).
    ``latency_target_s``: default per-request latency target of the ``valora`` policy.
    ``calibrate_cost_model``: the ``valora`` policy scales its profiled step costs by what the
    engine's own steps measure, per path (eager / graph-replayed;
    ``valora.orchestrator.calibration``) — the profile times the forward alone.
    """

    mode_policy: str = "unmerged-fcfs"
    starvation_s: float = 10.0
    restore: Literal["pristine", "resync"] = "pristine"
    cost_model_path: str | None = None
    latency_target_s: float | None = None
    calibrate_cost_model: bool = True

    def __post_init__(self) -> None:
        _require(self.starvation_s > 0, "starvation_s must be positive")
        _require(self.restore in ("pristine", "resync"), "restore must be 'pristine' or 'resync'")
        _require(
            self.latency_target_s is None or self.latency_target_s > 0,
            "latency_target_s must be positive",
        )


@dataclass(frozen=True)
class ImageConfig:
    """Limits on images accepted in requests.

    ``max_image_pixels``: width × height of one decoded image. ``max_image_bytes``: encoded size
    of one image. ``max_images_per_request``: images in one request.
    """

    max_image_pixels: int = 16_000_000
    max_image_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 8

    def __post_init__(self) -> None:
        _require(
            self.max_image_pixels > 0 and self.max_image_bytes > 0, "image limits must be positive"
        )


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; build one with ``EngineConfig.create(**flat_kwargs)``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    device: str = "auto"

    @classmethod
    def create(cls, **kwargs: object) -> EngineConfig:
        """Route flat keyword arguments (``page_size=32``, ``max_loras=4``) to their section."""
        sections: dict[str, dict[str, object]] = {
            "model": {},
            "cache": {},
            "scheduler": {},
            "lora": {},
            "image": {},
            "orchestrator": {},
        }
        classes: dict[str, type] = {
            "model": ModelConfig,
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "lora": LoRAConfig,
            "image": ImageConfig,
            "orchestrator": OrchestratorConfig,
        }
        device = "auto"
        for key, value in kwargs.items():
            if key == "device":
                device = str(value)
                continue
            for name, klass in classes.items():
                if key in {f.name for f in fields(klass)}:
                    sections[name][key] = value
                    break
            else:
                raise InvalidRequestError(f"unknown engine option {key!r}")
        return cls(
            model=ModelConfig(**sections["model"]),  # type: ignore[arg-type]
            cache=CacheConfig(**sections["cache"]),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(**sections["scheduler"]),  # type: ignore[arg-type]
            lora=LoRAConfig(**sections["lora"]),  # type: ignore[arg-type]
            image=ImageConfig(**sections["image"]),  # type: ignore[arg-type]
            orchestrator=OrchestratorConfig(**sections["orchestrator"]),  # type: ignore[arg-type]
            device=device,
        )
