"""Bench-side helpers for the ``stock`` vs ``fused`` comparison of valora's per-layer ops.

The fused RMSNorm (+ residual add), rotary and SiLU-and-mul kernels live in the package
(``valora/layers/fused_kernels.py``, chosen by ``valora/layers/fused_select.py``); the benchmark
runs each section under a forced mode: ``stock`` = ``VALORA_FUSED_LAYERS=0`` (the PyTorch twins,
what valora ran before), ``fused`` = the kernels. Before the fused rows it checks the kernels
against the twins at LLaVA-1.5-7B shapes on the GPU (``check_against_stock``) and counts the
CUDA kernels one eager decode step launches per decoder layer in each mode (``kernels_per_step``).
Every ``--layers`` label of ``bench_decode.py`` is one ``Label`` in ``LABELS`` (what it sets
beside the per-layer kernels: overlap, K/V write, PDL, the skinny GEMM, few-adapter captures);
``label_settings`` applies one for a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from valora.config import LoRAConfig
from valora.layers import fused_kernels
from valora.layers.activation import silu_and_mul_torch
from valora.layers.fused_select import FusedMode, fused_layers, set_fused_kv_write
from valora.layers.lora_overlap import set_lora_delta_fold
from valora.layers.norm import add_rms_norm_torch, rms_norm_torch
from valora.layers.rotary import apply_rotary_torch
from valora.ops.pdl import set_pdl
from valora.ops.skinny_gemm import set_skinny_gemm

DEFAULT_OVERLAP = LoRAConfig().overlap_max_tokens


@dataclass(frozen=True)
class Label:
    """What a ``bench_decode.py --layers`` label sets; a field left at its default runs the
    engine's default.

    ``mode``: the per-layer op kernels (``fused_layers``: ``"off"`` = the PyTorch twins).
    ``kv_write``: K/V written in one launch (False: two ``index_copy_``,
    ``VALORA_FUSED_KV_WRITE=0``). ``overlap``: the largest step (tokens) whose LoRA deltas run
    beside the base GEMM (``Model.set_lora_overlap``). ``overlap_always``: PEFT names of linears
    that overlap at every size on top of that. ``pdl``: the LoRA op's programmatic dependent
    launch (``valora.ops.pdl.set_pdl``; None: default). ``skinny``: the skinny GEMM on / off
    (``set_skinny_gemm``; None: default). ``skinny_untuned``: the skinny GEMM's table entries
    ignored (``untuned_skinny_tiles``). ``few_adapters``: the decode graphs' few-adapter
    captures (``LoRAConfig.few_adapter_max``). ``delta_fold``: the LoRA deltas of ``o_proj`` /
    ``gate_up_proj`` / ``down_proj`` folded into the next op (``set_lora_delta_fold``; None:
    default)."""

    mode: FusedMode = "on"
    kv_write: bool = True
    overlap: int = DEFAULT_OVERLAP
    overlap_always: tuple[str, ...] = ()
    pdl: str | None = None
    skinny: bool | None = None
    skinny_untuned: bool = False
    few_adapters: bool = True
    delta_fold: bool | None = None


LABELS: dict[str, Label] = {
    "stock": Label(mode="off", kv_write=False),
    "fused": Label(),
    "serial": Label(overlap=0),
    "overlap": Label(overlap=256),
    "fused_kv": Label(),
    "split_kv": Label(kv_write=False),
    "overlap_o_down": Label(overlap_always=("o_proj", "down_proj")),
    "no_pdl": Label(pdl="off"),
    "pdl_expand": Label(pdl="expand"),
    "pdl_both": Label(pdl="both"),
    "cublas_base": Label(skinny=False),
    "skinny_untuned": Label(skinny_untuned=True),
    "few_off": Label(few_adapters=False),
    "delta_fold": Label(delta_fold=True),
    "delta_fold_off": Label(delta_fold=False),
}
"""Every label (``LAYERS_HELP`` says what each compares). ``fused_kv`` is kept as a name for the
rows measured before the one-launch K/V write became the default (session 10): the same as
``fused`` now. ``overlap_o_down`` tries overlapping the latency-bound o / down LoRA ops (small
``B``) at every batch (``bench/ops/NOTES.md``, session 11's leads)."""
LAYERS_HELP = (
    "comma list of per-layer op modes to bench: stock, fused (engine defaults), serial (fused, "
    "LoRA never overlapped), overlap (fused, LoRA beside the base GEMM up to 256 tokens), "
    "overlap_o_down (fused, o / down LoRA overlapped at every size), split_kv (fused, K/V "
    "written by two index_copy_, VALORA_FUSED_KV_WRITE=0), fused_kv (= fused since the "
    "one-launch K/V write became the default), no_pdl / pdl_expand / pdl_both (fused, the LoRA "
    "op's programmatic dependent launch off / on the expand / on both launches: VALORA_PDL), "
    "cublas_base (fused, the base projections on cuBLAS at every size: VALORA_SKINNY_GEMM=0), "
    "skinny_untuned (fused, the skinny GEMM's heuristic tiles, its table entries ignored), "
    "few_off (fused without the few-adapter cuBLAS captures), delta_fold / "
    "delta_fold_off (fused, the o / gate_up / down LoRA deltas folded into the next op or not: "
    "VALORA_LORA_DELTA_FOLD)")
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


@contextlib.contextmanager
def label_settings(model: object, name: str) -> Iterator[Label]:
    """Everything label ``name`` sets (``Label``), for the block; the defaults afterwards."""
    label = LABELS[name]
    set_overlap(model, label)
    set_fused_kv_write(label.kv_write)
    set_pdl(label.pdl)
    set_skinny_gemm(label.skinny)
    set_lora_delta_fold(label.delta_fold)
    try:
        with fused_layers(label.mode), untuned_skinny_tiles(label.skinny_untuned):
            yield label
    finally:
        model.set_lora_overlap(0)  # type: ignore[attr-defined]
        set_fused_kv_write(None)
        set_pdl(None)
        set_skinny_gemm(None)
        set_lora_delta_fold(None)


def set_overlap(model: object, label: Label) -> None:
    """``label``'s overlap (``Label.overlap`` for every linear, then ``Label.overlap_always``)."""
    model.set_lora_overlap(label.overlap)  # type: ignore[attr-defined]
    names = set(label.overlap_always)
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
