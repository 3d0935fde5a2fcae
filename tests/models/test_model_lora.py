"""Per-token adapters through the fused linears == each adapter merged into the weights by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import CheckpointFactory
from hf_reference import hf_prompt
from paged_batch import Chunk, PagedRunner, rel_err
from safetensors.torch import load_file

from valora.layers import lora_overlap
from valora.models import LORA_MODULE_NAMES, load_model
from valora.models.base import CausalLMBase

TOL = 1e-4
NUM_SLOTS, MAX_RANK = 4, 8
Adapter = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]  # key -> (A, B, scale)


def random_adapter(model: CausalLMBase, rank: int, modules: tuple[str, ...], seed: int) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    adapter: Adapter = {}
    for (layer, name), base in model.lora_base_weights().items():
        if name in modules:
            a = torch.randn(rank, base.shape[1], generator=gen) * 0.2
            b = torch.randn(base.shape[0], rank, generator=gen) * 0.2
            adapter[(layer, name)] = (a, b, 2.0 / rank)
    return adapter


def write_slot(model: CausalLMBase, slot: int, adapter: Adapter) -> None:
    """Store ``adapter`` in ``slot`` following the LoRASlotWeights layout."""
    for (layer, name), (weights, index) in model.lora_slot_map().items():
        if (layer, name) not in adapter:
            continue
        a, b, scale = adapter[(layer, name)]
        rank = a.shape[0]
        offset = sum(weights.slice_widths[:index])
        weights.lora_a[slot, index, :rank] = a
        weights.lora_b[slot, offset:offset + b.shape[0], :rank] = b
        weights.ranks[slot, index] = rank
        weights.scales[slot, index] = scale
        weights.ranks_cpu[slot][index] = rank


def merge(model: CausalLMBase, adapter: Adapter, sign: float = 1.0) -> None:
    base = model.lora_base_weights()
    for key, (a, b, scale) in adapter.items():
        base[key] += sign * scale * (b @ a)


def _prompts(path: object) -> list[list[int]]:
    tokens, _ = hf_prompt(path, 0)  # type: ignore[arg-type]
    return [[*tokens[: 10 + 4 * i], 50 + i, 60 + i, 70 + i] for i in range(4)]


def _run(model: CausalLMBase, prompts: list[list[int]], slots: list[int],
         corrections: list[int], num_slots: int) -> list[torch.Tensor]:
    """Prefill all prompts but their last 3 tokens in one step, then 3 batched decode steps."""
    runner = PagedRunner(model, num_lora_slots=num_slots)
    seqs = [runner.add_sequence() for _ in prompts]
    steps = [[(0, len(p) - 3) for p in prompts]] + [[(len(p) - 3 + k, 1) for p in prompts]
                                                    for k in range(3)]
    outputs: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in steps:
        chunks = [Chunk(seq, prompts[seq][start:start + n], lora_slot=slots[seq],
                        correction_slot=corrections[seq])
                  for seq, (start, n) in zip(seqs, step, strict=True)]
        for seq, logits in zip(seqs, runner.run(chunks), strict=True):
            outputs[seq].append(logits)
    return [torch.cat(o) for o in outputs]


@pytest.mark.parametrize(("b_layout", "delta_fold"),
                         [("column", "0"), ("rank", "0"), ("rank", "1")])
def test_lora_slots_match_hand_merged_weights(checkpoint: CheckpointFactory, b_layout: str,
                                              delta_fold: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with ``lora_b`` stored rank-major (``VALORA_LORA_B_LAYOUT=rank``), and with
    ``o_proj`` / ``down_proj``'s deltas added into the residual (the delta fold,
    ``set_lora_delta_fold``)."""
    monkeypatch.setenv("VALORA_LORA_B_LAYOUT", b_layout)
    monkeypatch.setattr(lora_overlap, "_DELTA_FOLD", [delta_fold == "1"])
    path = checkpoint("default")
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    model.init_lora(NUM_SLOTS, MAX_RANK)
    assert all(w.b_rank_major == (b_layout == "rank") for w, _ in model.lora_slot_map().values())
    adapters = [random_adapter(model, 8, LORA_MODULE_NAMES, seed=1),
                random_adapter(model, 3, ("q_proj", "v_proj", "down_proj"), seed=2),
                random_adapter(model, 5, ("k_proj", "o_proj", "gate_proj", "up_proj"), seed=3)]
    for slot, adapter in zip((0, 2, 3), adapters, strict=True):
        write_slot(model, slot, adapter)
    prompts = _prompts(path)
    slots = [0, 2, -1, 3]
    batched = _run(model, prompts, slots, [-1] * 4, NUM_SLOTS)
    base = _run(model, prompts, [-1] * 4, [-1] * 4, NUM_SLOTS)
    assert rel_err(batched[2], base[2]) < TOL  # the adapter-free row is untouched
    for seq, adapter in ((0, adapters[0]), (1, adapters[1]), (3, adapters[2])):
        merged = load_model(str(path), dtype=torch.float32, device="cpu")
        merge(merged, adapter)
        reference = _run(merged, [prompts[seq]], [-1], [-1], 0)[0]
        assert rel_err(batched[seq], base[seq]) > 100 * TOL  # the adapter matters
        assert rel_err(batched[seq], reference) < TOL, f"sequence {seq}"


@pytest.mark.parametrize("delta_fold", ["0", "1"])
def test_mixed_mode_subtracts_the_merged_adapter(checkpoint: CheckpointFactory,
                                                 delta_fold: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_overlap, "_DELTA_FOLD", [delta_fold == "1"])
    path = checkpoint("default")
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    model.init_lora(NUM_SLOTS, MAX_RANK)
    first = random_adapter(model, 4, LORA_MODULE_NAMES, seed=4)
    second = random_adapter(model, 6, ("q_proj", "k_proj", "up_proj", "down_proj"), seed=5)
    write_slot(model, 1, first)
    write_slot(model, 2, second)
    prompts = _prompts(path)[:3]
    unmerged = _run(model, prompts, [1, 2, -1], [-1, -1, -1], NUM_SLOTS)
    merge(model, first)  # mixed mode: `first` folded into the base weights
    mixed = _run(model, prompts, [-1, 2, -1], [-1, 1, 1], NUM_SLOTS)
    for seq in range(3):
        assert rel_err(mixed[seq], unmerged[seq]) < TOL, f"sequence {seq}"


def test_lora_base_weights_are_views_of_the_named_checkpoint_rows(
        checkpoint: CheckpointFactory) -> None:
    path = checkpoint("default")
    model = load_model(str(path), dtype=torch.float32, device="cpu")
    tensors = load_file(str(path / "model.safetensors"))
    views = model.lora_base_weights()
    assert len(views) == model.spec.num_layers * len(LORA_MODULE_NAMES)
    for (layer, name), view in views.items():
        kind = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        expected = tensors[f"language_model.model.layers.{layer}.{kind}.{name}.weight"]
        assert torch.equal(view, expected), (layer, name)
    model.init_lora(2, 4)
    for key, (weights, index) in model.lora_slot_map().items():
        assert weights.slice_widths[index] == views[key].shape[0]
        assert weights.lora_a.shape[-1] == views[key].shape[1]
    views[(1, "v_proj")].zero_()  # writes through to the fused weight
    assert float(model.lora_base_weights()[(1, "v_proj")].abs().sum()) == 0.0
