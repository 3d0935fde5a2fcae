"""``PiecewiseGraphRunner``: eager steps as replayed row-wise pieces around eager attention give
the model's answer.

CPU: the runner's eager mode (the same static buffers, bucket padding and LoRA segments, no
capture) against the reference model (torch attention, reference LoRA) over chunked prefills,
image rows, decodes and every LoRA variant; padding rows full of NaN leave real rows alone
(the engine with the pieces: ``tests/engine/test_piecewise_engine.py``). ``gpu``: captured pieces against eager forwards, with
adapters rewritten in place after capture (no recapture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attn_cases import DEVICE, rel_err
from gpu_stepper import Sequence, Stepper, fill_slots, make_lora_model

import valora.layers.attention_triton  # noqa: F401  (registers the "triton" backend)
from valora.engine.piecewise_graphs import (
    PiecewiseGraphRunner,
    capture_piecewise_graphs,
    piecewise_static_bytes,
    token_buckets,
)
from valora.errors import ValoraError
from valora.layers import fused_select
from valora.models.base import CausalLMBase

NUM_SLOTS, MAX_RANK, PAGE_SIZE = 4, 8, 4
BUCKETS = (4, 8, 16)


def make_model(path: Path, backend: str, device: torch.device, dtype: torch.dtype,
               ranks: list[int], seed: int = 3) -> CausalLMBase:
    return make_lora_model(path, backend, device, dtype, ranks, NUM_SLOTS, MAX_RANK, seed)


def prompts(model: CausalLMBase, slots: list[tuple[int, int]], images: bool = False
            ) -> list[Sequence]:
    """Sequences of 6, 9, 12, … tokens; with ``images`` the first holds three image tokens
    whose rows are random (the rows a vision tower would give)."""
    vocab = model.spec.vocab_size - 1  # the tiny LLaVA's image token is the last id
    generator = torch.Generator().manual_seed(7)
    out = []
    for i, (own, correction) in enumerate(slots):
        tokens = torch.randint(0, vocab, (6 + 3 * i,), generator=generator).tolist()
        seq = Sequence(tokens, lora_slot=own, correction_slot=correction)
        if images and i == 0:
            image = model.spec.image_token_id
            assert image is not None
            seq.tokens[1:4] = [image] * 3
            rows = torch.randn(3, model.spec.hidden_size, generator=generator)
            seq.image_rows = rows.to(model.device, model.dtype)
        out.append(seq)
    return out


def test_token_buckets() -> None:
    assert token_buckets(1000) == (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1000)
    assert token_buckets(5, (4, 8)) == (4, 5)
    with pytest.raises(ValoraError):
        token_buckets(0)


@pytest.mark.parametrize(("variant", "slots", "fuse", "images"), [
    ("base", [(-1, -1)] * 3, False, True),
    ("lora", [(0, -1), (2, -1), (-1, -1)], False, True),
    ("mixed", [(0, 1), (-1, 1), (1, -1)], False, False),
    ("mixed", [(-1, 1), (-1, 1)], False, False),  # base rows while slot 1 is merged
    ("mixed", [(0, 1), (-1, 1), (-1, -1), (2, 1)], True, False),  # engine-planned, one op
], ids=["base-images", "lora-images", "mixed", "correction-only", "mixed-fused"])
def test_eager_pieces_match_reference(tiny_llava: Path, variant: str,
                                      slots: list[tuple[int, int]], fuse: bool,
                                      images: bool) -> None:
    """Prefill chunks of 5 tokens (bucket 8 for one row, 16 for several: padded), then decode
    steps, all through the pieces; the reference runs ``model.forward`` (torch attention,
    reference LoRA)."""
    ranks = [3, 8, 5]
    fast = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    ref = make_model(tiny_llava, "torch", torch.device("cpu"), torch.float32, ranks)
    # A chunked prefill's step may hold only some rows: every variant up to ``variant``.
    variants = {"base": ("base",), "lora": ("base", "lora")}.get(variant,
                                                              ("base", "lora", "mixed"))
    runner = PiecewiseGraphRunner(fast, 24, num_lora_slots=NUM_SLOTS, variants=variants,
                                  buckets=BUCKETS, use_graphs=False, fuse_correction=fuse)
    runner.capture()
    assert runner.buckets == (4, 8, 16, 24) and runner.num_pieces == fast.spec.num_layers + 1
    got, got_logits = Stepper(fast, 64, PAGE_SIZE, NUM_SLOTS, "triton").greedy(
        prompts(fast, slots, images), 3, 5, piecewise=runner)
    want, want_logits = Stepper(ref, 64, PAGE_SIZE, NUM_SLOTS, "reference", seed=1).greedy(
        prompts(ref, slots, images), 3, 5)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel_err(a, b) < 1e-5
    assert runner.num_replays > 3


@pytest.mark.parametrize("mode", ["auto", "on"], ids=["twins", "fused-kernels"])
def test_padding_rows_never_reach_real_rows(tiny_llava: Path, mode: str) -> None:
    """NaN in every static buffer's padding rows (and stale slots) changes nothing: the pieces
    are row-wise and the LoRA kernels skip slot -1. ``fused-kernels``: the fused norm and rotary
    kernels (Triton's interpreter on the CPU) write into the static buffers directly."""
    ranks = [4, 6]
    fast = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    ref = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    runner = PiecewiseGraphRunner(fast, 16, num_lora_slots=NUM_SLOTS, variants=("lora",),
                                  buckets=BUCKETS, use_graphs=False)
    runner.capture()
    for buffer in (runner.embeds, runner.residual, runner.q, runner.k, runner.v,
                   runner.attn_out, runner.cos, runner.sin, runner.hidden):
        buffer.fill_(float("nan"))
    runner.token_slots.fill_(1)
    slots = [(0, -1), (1, -1)]
    fast_steps = Stepper(fast, 32, PAGE_SIZE, NUM_SLOTS, "triton")
    slow_steps = Stepper(ref, 32, PAGE_SIZE, NUM_SLOTS, "triton")
    seqs_fast, seqs_slow = prompts(fast, slots), prompts(ref, slots)
    batch = fast_steps.build(seqs_fast, [5, 6])  # 11 tokens: bucket 16, five padding rows
    with fused_select.fused_layers(mode):
        want = ref.forward(slow_steps.build(seqs_slow, [5, 6]))
        with torch.inference_mode():
            got = runner.run(batch)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


def test_can_run_refuses_what_no_piece_serves(tiny_llava: Path) -> None:
    model = make_model(tiny_llava, "triton", DEVICE, torch.float32, [4])
    runner = PiecewiseGraphRunner(model, 8, num_lora_slots=NUM_SLOTS, variants=("base",),
                                  buckets=BUCKETS, use_graphs=False)
    stepper = Stepper(model, 32, PAGE_SIZE, NUM_SLOTS, "triton")
    seqs = prompts(model, [(-1, -1), (-1, -1), (0, -1)])
    for seq in seqs:
        seq.tokens *= 3
    prefill = stepper.build(seqs[:2], [3, 3])
    assert not runner.can_run(prefill), "not captured yet"
    runner.capture()
    assert runner.can_run(prefill)
    assert runner.can_run(stepper.build(seqs[:2], [1, 1])), "decode steps are steps too"
    assert not runner.can_run(stepper.build(seqs[:2], [5, 5])), "10 tokens > largest bucket 8"
    assert not runner.can_run(stepper.build(seqs[1:], [1, 1])), "lora variant not captured"
    with pytest.raises(ValoraError):
        runner.run(stepper.build(seqs[1:], [1, 1]))
    with pytest.raises(ValoraError, match="variants"):
        PiecewiseGraphRunner(model, 8, variants=("lora",), use_graphs=False)
    assert capture_piecewise_graphs(model, 8, num_lora_slots=0, variants=("lora",),
                                    use_graphs=False) is not None  # falls back to base
    assert piecewise_static_bytes(model, 8) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True], ids=["two-ops", "fused"])
def test_gpu_pieces_match_eager_and_survive_adapter_changes(tiny_llava: Path,
                                                           fuse: bool) -> None:
    """Captured pieces (all variants, buckets padded) against eager forwards of a twin model;
    adapters rewritten in place between rounds replay the same graphs."""
    ranks = [8, 2, 5, 7]
    graphed = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    eager = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    runner = PiecewiseGraphRunner(graphed, 64, num_lora_slots=NUM_SLOTS,
                                  variants=("base", "lora", "mixed"), buckets=BUCKETS,
                                  fuse_correction=fuse)
    runner.capture()
    assert all(len(e.graphs) == runner.num_pieces for e in runner._entries.values())
    graphs = {key: list(entry.graphs) for key, entry in runner._entries.items()}
    slot_sets = ([[(-1, -1)] * 3, [(0, -1), (2, -1), (-1, -1)],
                  [(0, 3), (-1, 3), (-1, -1), (2, 3)]])
    for round_ in range(2):
        for slots in slot_sets:
            fast = Stepper(graphed, 200, PAGE_SIZE, NUM_SLOTS, "triton")
            slow = Stepper(eager, 200, PAGE_SIZE, NUM_SLOTS, "triton")
            got, got_logits = fast.greedy(prompts(graphed, slots, images=True), 3, 7,
                                          piecewise=runner)
            want, want_logits = slow.greedy(prompts(eager, slots, images=True), 3, 7)
            assert got == want
            for a, b in zip(got_logits, want_logits, strict=True):
                assert rel_err(a, b) < 1e-4
        fill_slots(graphed, [4, 8, 1, 6], seed=20 + round_)  # new adapters, same storage
        fill_slots(eager, [4, 8, 1, 6], seed=20 + round_)
    assert {key: list(entry.graphs) for key, entry in runner._entries.items()} == graphs


@pytest.mark.gpu
def test_gpu_pieces_in_bf16_within_tolerance(tiny_llava: Path) -> None:
    """bf16: one step of three whole prefills (5 + 8 + 11 = 24 tokens, bucket 32) through the
    captured pieces against the eager forward, logits within bf16 tolerance."""
    ranks = [8, 4]
    graphed = make_model(tiny_llava, "triton", DEVICE, torch.bfloat16, ranks)
    eager = make_model(tiny_llava, "triton", DEVICE, torch.bfloat16, ranks)
    runner = capture_piecewise_graphs(graphed, 32, num_lora_slots=NUM_SLOTS,
                                      variants=("base", "lora"), buckets=BUCKETS)
    assert runner is not None and runner.use_graphs
    slots = [(0, -1), (1, -1), (-1, -1)]
    fast = Stepper(graphed, 100, PAGE_SIZE, NUM_SLOTS, "triton")
    slow = Stepper(eager, 100, PAGE_SIZE, NUM_SLOTS, "triton")
    got = fast.logits(fast.build(prompts(graphed, slots), [5, 8, 11]), piecewise=runner)
    want = slow.logits(slow.build(prompts(eager, slots), [5, 8, 11]))
    assert rel_err(got.float(), want.float()) < 3e-2
