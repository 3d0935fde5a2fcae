"""The LoRA-operator methods compared by ``bench_lora_ops.py``, each built on one input set.

Every builder returns a zero-argument callable that adds the LoRA term into the set's ``y`` in
place (the base GEMM writes its own output). Weights in valora's slot storage carry poison above
each adapter's rank; the padded peers get zero-padded copies, as a real loader would give them.

- ``valora``: the Triton backend (``prepare`` outside the timed region, as for vLLM);
- ``peft_loop``: per adapter in the batch, gather its rows, ``(x·Aᵀ)·Bᵀ·s``, scatter-add (PEFT's
  mixed-batch forward);
- ``gathered_bmm``: gather each token's A and B padded to the batch's largest rank, two ``bmm``;
- ``vllm``: vLLM 0.33 ``lora_shrink`` + ``lora_expand``, every adapter padded to the batch's
  largest rank, the scale folded into B (as vLLM does when it loads adapters). vLLM caches the
  device pointer table and strides of a list of weight tensors keyed by their ``data_ptr``s only
  (``_LORA_A_PTR_DICT`` / ``_LORA_B_PTR_DICT`` in its ``utils.py``), on the assumption that its
  weight buffers live for the whole process. Here each grid point allocates new weights, so a
  freed block reused at the same addresses with another shape would hit a stale entry (strides
  of the old rank): ``build_vllm`` evicts its keys and fills the entries for its own tensors.
- ``base_gemm``: ``x · Wᵀ`` of the layer the LoRA rides on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from valora.ops.lora import LoRASlotWeights, lora_apply, prepare_lora_batch
from valora.ops.lora_problems import zero_padding

REPO = Path(__file__).resolve().parents[2]
Call = Callable[[], object]


@dataclass
class InputSet:
    x: torch.Tensor
    y: torch.Tensor
    weights: LoRASlotWeights
    slots: torch.Tensor  # [T] int32 on the GPU
    slots_cpu: list[int]
    y_initial: torch.Tensor  # y before any method ran (each check starts from it)

    @property
    def active(self) -> list[int]:
        return sorted({s for s in self.slots_cpu if s >= 0})

    @property
    def batch_max_rank(self) -> int:
        return max((max(self.weights.ranks_cpu[s]) for s in self.active), default=1)

    def offsets(self) -> list[int]:
        widths = self.weights.slice_widths
        return [sum(widths[:j]) for j in range(len(widths) + 1)]


def build_valora(s: InputSet) -> Call:
    batch = prepare_lora_batch(s.slots, s.weights.num_slots, "triton", active_slots=s.active)
    return lambda: lora_apply(s.y, s.x, s.weights, batch)


def build_peft_loop(s: InputSet) -> Call:
    rows = {slot: torch.tensor([t for t, v in enumerate(s.slots_cpu) if v == slot],
                               device=s.x.device) for slot in s.active}
    scales = s.weights.scales.tolist()
    offsets = s.offsets()
    w = s.weights

    def run() -> None:
        for slot, index in rows.items():
            xs = s.x.index_select(0, index)
            for j, rank in enumerate(w.ranks_cpu[slot]):
                if rank == 0:
                    continue
                lo, hi = offsets[j], offsets[j + 1]
                delta = (xs @ w.lora_a[slot, j, :rank].t()) @ w.lora_b[slot, lo:hi, :rank].t()
                s.y[:, lo:hi].index_add_(0, index, delta * scales[slot][j])
    return run


def gathered_bytes(s: InputSet) -> int:
    rank = s.batch_max_rank
    return s.x.shape[0] * rank * (s.x.shape[1] + max(s.weights.slice_widths)) * 2


def build_gathered_bmm(s: InputSet) -> Call:
    rank = s.batch_max_rank
    padded = zero_padding(s.weights)
    a = padded.lora_a[:, :, :rank].contiguous()
    b = padded.lora_b[:, :, :rank].contiguous()
    has = s.slots >= 0
    slot_c = torch.where(has, s.slots, 0).long()
    scale = s.weights.scales[slot_c] * has.unsqueeze(1)  # [T, J]; rows without adapter: 0
    offsets = s.offsets()

    def run() -> None:
        x = s.x.unsqueeze(1)
        for j in range(len(offsets) - 1):
            lo, hi = offsets[j], offsets[j + 1]
            h = torch.bmm(x, a[slot_c, j].transpose(1, 2))              # [T, 1, r]
            h = (h.float() * scale[:, j, None, None]).to(x.dtype)
            delta = torch.bmm(h, b[slot_c, lo:hi].transpose(1, 2))      # [T, 1, w]
            s.y[:, lo:hi] += delta.squeeze(1)
    return run


def vllm_ops() -> tuple[Callable[..., object], Callable[..., object], type] | None:
    """vLLM's kernels from ``.peers`` (``shared/peers/vllm_lora/extract.sh``), or None when
    absent. Either layout: ``extract.sh .peers/vllm`` (the package at ``.peers/vllm/vllm``) or
    the script's default destination ``.peers`` (the package at ``.peers/vllm``)."""
    roots = [REPO / ".peers" / "vllm", REPO / ".peers"]
    found = next((root for root in roots if (root / "vllm" / "lora").is_dir()), None)
    if found is None:
        return None
    sys.path.insert(0, str(found))
    from vllm.lora.ops.triton_ops.lora_expand_op import lora_expand
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.ops.triton_ops.lora_shrink_op import lora_shrink
    return lora_shrink, lora_expand, LoRAKernelMeta


def build_vllm(s: InputSet) -> Call:
    ops = vllm_ops()
    assert ops is not None
    lora_shrink, lora_expand, meta_cls = ops
    rank = s.batch_max_rank
    padded = zero_padding(s.weights)
    offsets = s.offsets()
    num_slices = len(offsets) - 1
    a_list = [padded.lora_a[:, j, :rank].contiguous() for j in range(num_slices)]
    b_list = [(padded.lora_b[:, offsets[j]:offsets[j + 1], :rank].float()
               * s.weights.scales[:, j, None, None]).to(s.x.dtype).contiguous()
              for j in range(num_slices)]
    num_tokens = s.x.shape[0]
    refresh_vllm_pointer_cache(a_list, b_list, s.x.device)
    meta = meta_cls.make(max_loras=s.weights.num_slots, max_num_tokens=num_tokens,
                         device=s.x.device)
    meta.prepare_tensors(s.slots)
    args = meta.meta_args(num_tokens, specialize_active_lora=True)
    buffer = torch.zeros(num_slices, num_tokens, rank, dtype=torch.float32, device=s.x.device)

    def run() -> None:
        lora_shrink(s.x, a_list, buffer, *args, 1.0)
        lora_expand(buffer, b_list, s.y, *args, offset_start=0, add_inputs=True)
    return run


def refresh_vllm_pointer_cache(a_list: list[torch.Tensor], b_list: list[torch.Tensor],
                               device: torch.device) -> None:
    """Evict vLLM's cached pointer/stride entries for these tensors' addresses and rebuild them
    from the tensors themselves (see the module docstring: ``vllm`` method)."""
    from vllm.lora.ops.triton_ops import utils as vllm_utils
    vllm_utils._LORA_A_PTR_DICT.pop(tuple(t.data_ptr() for t in a_list), None)
    vllm_utils._LORA_B_PTR_DICT.pop(tuple(t.data_ptr() for t in b_list), None)
    vllm_utils._get_lora_a_ptr(a_list, device)
    vllm_utils._get_lora_b_ptr(b_list, 0, device)


def build_base_gemm(x: torch.Tensor, weight: torch.Tensor) -> tuple[Call, torch.Tensor]:
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    return (lambda: torch.mm(x, weight.t(), out=out)), out


BUILDERS: dict[str, Callable[[InputSet], Call]] = {
    "valora": build_valora,
    "vllm": build_vllm,
    "peft_loop": build_peft_loop,
    "gathered_bmm": build_gathered_bmm,
}
