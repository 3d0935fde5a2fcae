"""Bench-side helpers for the ``stock`` vs ``fused`` comparison of valora's per-layer ops.

The fused RMSNorm (+ residual add), rotary and SiLU-and-mul kernels live in the package
(``valora/layers/fused_kernels.py``, chosen by ``valora/layers/fused_select.py``); the benchmark
runs each section under a forced mode: ``stock`` = ``VALORA_FUSED_LAYERS=0`` (the PyTorch twins,
what valora ran before), ``fused`` = the kernels. Before the fused rows it checks the kernels
against the twins at LLaVA-1.5-7B shapes on the GPU (``check_against_stock``) and counts the
CUDA kernels one eager decode step launches per decoder layer in each mode (``kernels_per_step``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from valora.config import LoRAConfig
from valora.layers import fused_kernels
from valora.layers.activation import silu_and_mul_torch
from valora.layers.fused_select import FusedMode, fused_layers
from valora.layers.norm import add_rms_norm_torch, rms_norm_torch
from valora.layers.rotary import apply_rotary_torch

LABEL_MODES: dict[str, FusedMode] = {"stock": "off", "fused": "on", "serial": "on",
                                     "overlap": "on", "fused_kv": "on", "split_kv": "on",
                                     "overlap_o_down": "on", "no_pdl": "on", "pdl_expand": "on",
                                     "pdl_both": "on", "cublas_base": "on",
                                     "skinny_untuned": "on", "few_off": "on"}
LABEL_KV_WRITE: dict[str, bool] = {"stock": False, "split_kv": False}
"""Labels whose K/V cache write is two ``index_copy_`` (``VALORA_FUSED_KV_WRITE=0``); every other
label writes K/V in one launch, the engine's default on CUDA since session 10 (``fused_kv`` is
kept as a name for the rows measured before that: the same as ``fused`` now)."""
DEFAULT_OVERLAP = LoRAConfig().overlap_max_tokens
LABEL_OVERLAP: dict[str, int] = {"stock": DEFAULT_OVERLAP, "fused": DEFAULT_OVERLAP,
                                 "serial": 0, "overlap": 256, "fused_kv": DEFAULT_OVERLAP,
                                 "split_kv": DEFAULT_OVERLAP, "overlap_o_down": DEFAULT_OVERLAP,
                                 "no_pdl": DEFAULT_OVERLAP, "pdl_expand": DEFAULT_OVERLAP,
                                 "pdl_both": DEFAULT_OVERLAP, "cublas_base": DEFAULT_OVERLAP,
                                 "skinny_untuned": DEFAULT_OVERLAP, "few_off": DEFAULT_OVERLAP}
"""Per label, the largest step (tokens) whose LoRA deltas run beside the base GEMM
(``Model.set_lora_overlap``): ``stock`` / ``fused`` as the engine runs by default, ``serial``
never, ``overlap`` at every decode size benched."""
LABEL_PDL: dict[str, str] = {"no_pdl": "off", "pdl_expand": "expand", "pdl_both": "both"}
"""Labels with a programmatic-dependent-launch mode of the LoRA op (``valora.ops.pdl.set_pdl``,
``VALORA_PDL``); every other label runs the engine's default."""
LABEL_SKINNY: dict[str, bool] = {"cublas_base": False}
"""Labels whose base projections run on cuBLAS at every size (``VALORA_SKINNY_GEMM=0``); every
other label takes the engine's default, the Triton skinny GEMM up to 32 rows
(``valora.ops.skinny_gemm``, session 13)."""
LABEL_SKINNY_UNTUNED = ("skinny_untuned",)
"""Labels whose skinny GEMM ignores the GPU table's ``skinny:`` entries and takes the heuristic
tile everywhere (``untuned_skinny_tiles``): the tuned table against what it replaced, one process."""
LABEL_NO_FEW_ADAPTERS = ("few_off",)
"""Labels whose decode graphs have no few-adapter captures (``CudaGraphRunner``: the LoRA graphs
of buckets 8 / 16 captured again with the base GEMM on cuBLAS, replayed for ≤ 8 adapters;
``LoRAConfig.few_adapter_max``): every LoRA step on the skinny GEMM, as in session 13."""
LABEL_OVERLAP_ALWAYS: dict[str, tuple[str, ...]] = {"overlap_o_down": ("o_proj", "down_proj")}
"""Labels whose linears of these PEFT names overlap at every size on top of ``LABEL_OVERLAP``:
``overlap_o_down`` tries overlapping the latency-bound o / down LoRA ops (small ``B``) at every
batch while qkv / gate_up follow the default (``bench/ops/NOTES.md``, session 11's leads)."""
LAYERS_HELP = (
    "comma list of per-layer op modes to bench: stock, fused (engine defaults), serial (fused, "
    "LoRA never overlapped), overlap (fused, LoRA beside the base GEMM up to 256 tokens), "
    "overlap_o_down (fused, o / down LoRA overlapped at every size), split_kv (fused, K/V "
    "written by two index_copy_, VALORA_FUSED_KV_WRITE=0), fused_kv (= fused since the "
    "one-launch K/V write became the default), no_pdl / pdl_expand / pdl_both (fused, the LoRA "
    "op's programmatic dependent launch off / on the expand / on both launches: VALORA_PDL), "
    "cublas_base (fused, the base projections on cuBLAS at every size: VALORA_SKINNY_GEMM=0), "
    "skinny_untuned (fused, the skinny GEMM's heuristic tiles, its table entries ignored), "
    "few_off (fused without the few-adapter cuBLAS captures)")
"""``bench_decode.py --layers``'s help: the labels above."""


@contextlib.contextmanager
def untuned_skinny_tiles(on: bool) -> Iterator[None]:
    """While ``on``: the skinny GEMM's tile choice as if the GPU table had no ``skinny:`` entry
    (``skinny_gemm.resolve_skinny_tile`` with no record: the heuristic, cut to the device's shared
    memory). Graphs captured inside keep those tiles."""
    from valora.ops import skinny_gemm

    if not on:
        yield
        return
    saved = skinny_gemm._select

    def heuristic(device: torch.device, num_tokens: int, out_features: int, in_features: int,
                  element_size: int) -> skinny_gemm.SkinnyTile | None:
        return skinny_gemm.resolve_skinny_tile(None, num_tokens, out_features, in_features,
                                               element_size, skinny_gemm.smem_limit(device))

    skinny_gemm._select = heuristic  # type: ignore[assignment]
    try:
        yield
    finally:
        skinny_gemm._select = saved


def set_overlap(model: object, label: str) -> None:
    """``label``'s overlap (``LABEL_OVERLAP`` for every linear, then ``LABEL_OVERLAP_ALWAYS``)."""
    model.set_lora_overlap(LABEL_OVERLAP[label])  # type: ignore[attr-defined]
    names = set(LABEL_OVERLAP_ALWAYS.get(label, ()))
    if names:
        for linear, _ in model.decoder.lora_targets().values():  # type: ignore[attr-defined]
            if set(linear.slice_names) <= names:
                linear.lora_overlap_tokens = 1 << 20


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_against_stock(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                        tokens: int = 37) -> dict[str, float]:
    """Relative error of each kernel against its PyTorch twin on random data at 7B shapes
    (hidden 4096, 32 + 32 heads of 128 sliced from one qkv output, intermediate 11008)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    weight, x, residual = rand(4096), rand(tokens, 4096), rand(tokens, 4096)
    qkv = rand(tokens, 3 * 4096)
    q = qkv[:, :4096].view(tokens, 32, 128)
    k = qkv[:, 4096:8192].view(tokens, 32, 128)
    angles = torch.rand(tokens, 64, generator=generator, device=device) * 6
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    gate_up = rand(tokens, 2 * 11008)
    norm, _ = fused_kernels.rms_norm(x, weight, 1e-5)
    add_norm, total = fused_kernels.rms_norm(x, weight, 1e-5, residual)
    want_add_norm, want_total = add_rms_norm_torch(x, residual, weight, 1e-5)
    assert total is not None
    fq, fk = fused_kernels.rotary(q, k, cos, sin)
    sq, sk = apply_rotary_torch(q, k, cos, sin)
    return {"rms_norm": rel_err(norm, rms_norm_torch(x, weight, 1e-5)),
            "add_rms_norm": max(rel_err(add_norm, want_add_norm), rel_err(total, want_total)),
            "rotary": max(rel_err(fq, sq), rel_err(fk, sk)),
            "silu_and_mul": rel_err(fused_kernels.silu_and_mul(gate_up),
                                    silu_and_mul_torch(gate_up))}


def kernels_per_step(step: Callable[[], object], mode: FusedMode) -> int:
    """CUDA kernels one eager call of ``step`` launches in ``mode`` (torch profiler count)."""
    from torch.profiler import ProfilerActivity, profile

    with fused_layers(mode):
        step()  # compile / warm up outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    return sum(1 for event in prof.events()
               if event.device_type == torch.autograd.DeviceType.CUDA)
