"""``CudaGraphRunner``: decode steps through static, padded buffers give the model's answer.

CPU: the runner's eager mode (same buffers, padding and LoRA segments, no capture) against the
reference model (torch attention, reference LoRA). ``gpu``: captured graphs against eager
forwards, across buckets, with adapters rewritten in place after capture (no recapture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from attn_cases import DEVICE, rel_err
from gpu_stepper import Sequence, Stepper, fill_slots, make_lora_model

import valora.layers.attention_triton  # noqa: F401  (registers the "triton" backend)
from valora.engine.cuda_graph import (
    FEW_ADAPTERS,
    CudaGraphRunner,
    batch_buckets,
    few_adapter_captures,
)
from valora.errors import ValoraError
from valora.forward_batch import ForwardBatch
from valora.models.base import CausalLMBase

NUM_SLOTS, MAX_RANK, PAGE_SIZE = 4, 8, 4


def make_model(path: Path, backend: str, device: torch.device, dtype: torch.dtype,
               ranks: list[int], seed: int = 3) -> CausalLMBase:
    return make_lora_model(path, backend, device, dtype, ranks, NUM_SLOTS, MAX_RANK, seed)


def prompts(model: CausalLMBase, count: int, slots: list[tuple[int, int]]) -> list[Sequence]:
    vocab = model.spec.vocab_size - 1  # the tiny LLaVA's image token is the last id
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(count):
        tokens = torch.randint(0, vocab, (5 + 3 * i,), generator=generator).tolist()
        out.append(Sequence(tokens, lora_slot=slots[i][0], correction_slot=slots[i][1]))
    return out


def test_buckets() -> None:
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    assert batch_buckets(3, (1, 2, 4)) == (1, 2, 3)
    with pytest.raises(ValoraError):
        batch_buckets(0)


@pytest.mark.parametrize(("variant", "slots", "fuse"), [
    ("base", [(-1, -1)] * 3, False),
    ("lora", [(0, -1), (2, -1)], False),
    ("mixed", [(0, 1), (-1, 1), (1, -1)], False),
    ("mixed", [(-1, 1), (-1, 1)], False),  # base rows while slot 1 is merged: a correction alone
    ("mixed", [(0, 1), (-1, 1), (-1, -1), (2, 1)], False),  # as the engine plans mixed steps
    ("mixed", [(0, 1), (-1, 1), (-1, -1), (2, 1)], True),  # the same, one fused LoRA op
    ("mixed", [(-1, 1), (-1, 1)], True),
], ids=["base", "lora", "mixed", "correction-only", "mixed-engine", "mixed-fused",
        "correction-only-fused"])
def test_eager_runner_matches_reference(tiny_llava: Path, variant: str,
                                        slots: list[tuple[int, int]], fuse: bool) -> None:
    ranks = [3, 8, 5]
    fast = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    ref = make_model(tiny_llava, "torch", torch.device("cpu"), torch.float32, ranks)
    runner = CudaGraphRunner(fast, 4, max_context=64, page_size=PAGE_SIZE,
                             num_lora_slots=NUM_SLOTS, variants=(variant,), use_graphs=False,
                             fuse_correction=fuse)
    runner.capture()
    got, got_logits = Stepper(fast, 48, PAGE_SIZE, NUM_SLOTS, "triton").greedy(
        prompts(fast, len(slots), slots), 3, 4, runner)
    want, want_logits = Stepper(ref, 48, PAGE_SIZE, NUM_SLOTS, "reference", seed=1).greedy(
        prompts(ref, len(slots), slots), 3, 4)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel_err(a, b) < 1e-5


def test_can_run_refuses_what_no_graph_serves(tiny_llava: Path) -> None:
    model = make_model(tiny_llava, "triton", DEVICE, torch.float32, [4])
    runner = CudaGraphRunner(model, 2, max_context=16, page_size=PAGE_SIZE,
                             num_lora_slots=NUM_SLOTS, variants=("base",), use_graphs=False)
    stepper = Stepper(model, 32, PAGE_SIZE, NUM_SLOTS, "triton")
    seqs = prompts(model, 3, [(-1, -1), (-1, -1), (0, -1)])
    for seq in seqs:
        seq.tokens *= 3  # long enough for every step built below
    prefill = stepper.build(seqs[:2], [3, 3])
    decode = stepper.build(seqs[:2], [1, 1])
    assert not runner.can_run(decode), "not captured yet"
    runner.capture()
    assert runner.can_run(decode)
    assert not runner.can_run(prefill)
    assert not runner.can_run(stepper.build(seqs, [1, 1, 1])), "3 > max batch 2"
    assert not runner.can_run(stepper.build(seqs[1:], [1, 1])), "lora variant not captured"
    assert not runner.can_run(stepper.build(seqs[:2], [1, 1], width=5)), "page table too wide"
    with pytest.raises(ValoraError):
        runner.run(prefill)


def test_few_adapter_captures_serve_steps_with_few_adapters(tiny_llava: Path) -> None:
    """A bucket of ``few_adapter_buckets`` holds a second ``"lora"`` entry, replayed for steps of
    at most ``few_adapter_max`` distinct adapters (host-known) and matching the reference; other
    buckets, more adapters, unknown adapters and other variants take their variant's entry;
    without the ``"lora"`` variant or with ``few_adapter_max`` 0 there are none."""
    ranks = [3, 8, 5]
    fast = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    ref = make_model(tiny_llava, "torch", torch.device("cpu"), torch.float32, ranks)
    runner = CudaGraphRunner(fast, 4, max_context=64, page_size=PAGE_SIZE,
                             num_lora_slots=NUM_SLOTS, variants=("base", "lora"),
                             use_graphs=False, few_adapter_buckets=(2, 3, 64),
                             few_adapter_max=1)
    assert runner.few_adapter_buckets == (2,)  # buckets 1, 2, 4: only 2 is both
    assert set(runner._entries) == {(b, v) for b in (1, 2, 4) for v in ("base", "lora")} | {
        (2, FEW_ADAPTERS)}
    runner.capture()
    stepper = Stepper(fast, 48, PAGE_SIZE, NUM_SLOTS, "triton")
    seqs = prompts(fast, 4, [(0, -1), (0, -1), (2, -1), (-1, -1)])
    for seq in seqs:
        seq.tokens *= 2

    def key(chosen: list[Sequence]) -> tuple[int, str]:
        step = stepper.build(chosen, [1] * len(chosen))
        bucket = runner.bucket_for(len(chosen))
        assert bucket is not None
        return runner.entry_key(step, bucket)

    assert key(seqs[:2]) == (2, FEW_ADAPTERS)  # one adapter, bucket 2
    assert key([seqs[0], seqs[3]]) == (2, FEW_ADAPTERS)  # one adapter and a base row
    assert key(seqs[1:3]) == (2, "lora")  # two adapters
    assert key(seqs[:1]) == (1, "lora")  # bucket 1 has no second capture
    assert key(seqs[:3]) == (4, "lora")
    assert key(seqs[3:]) == (1, "base")
    unknown = stepper.build(seqs[:2], [1, 1])
    assert unknown.lora is not None
    unknown.lora.num_active_slots = -1  # e.g. slots only on the device
    assert runner.entry_key(unknown, 2) == (2, "lora")
    slots = [(0, -1), (-1, -1)]
    got, got_logits = Stepper(fast, 48, PAGE_SIZE, NUM_SLOTS, "triton").greedy(
        prompts(fast, 2, slots), 3, 4, runner)
    want, want_logits = Stepper(ref, 48, PAGE_SIZE, NUM_SLOTS, "reference", seed=1).greedy(
        prompts(ref, 2, slots), 3, 4)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel_err(a, b) < 1e-5
    for variants, few_max in ((("base",), 1), (("base", "lora"), 0)):
        none = CudaGraphRunner(fast, 4, max_context=64, page_size=PAGE_SIZE,
                               num_lora_slots=NUM_SLOTS, variants=variants, use_graphs=False,
                               few_adapter_buckets=(2,), few_adapter_max=few_max)
        assert none.few_adapter_buckets == ()
        assert all(v != FEW_ADAPTERS for _, v in none._entries)


def test_few_adapter_captures_follow_the_skinny_gemm_switch() -> None:
    """The engine asks for few-adapter captures only where the skinny GEMM serves the base
    projections (else both captures would be the same) and ``few_adapter_max`` > 0;
    ``skinny_gemm_forced`` restores the switch it found."""
    from valora.config import LoRAConfig
    from valora.ops.skinny_gemm import skinny_gemm_forced, skinny_gemm_switch

    cpu = torch.device("cpu")
    before = skinny_gemm_switch()
    assert few_adapter_captures(LoRAConfig(), cpu) == ((), 0)  # auto: CPU has no skinny GEMM
    with skinny_gemm_forced(True):
        assert few_adapter_captures(LoRAConfig(), cpu) == ((8, 16), 8)
        assert few_adapter_captures(LoRAConfig(few_adapter_max=0), cpu) == ((), 0)
        assert few_adapter_captures(LoRAConfig(few_adapter_buckets="4"), cpu) == ((4,), 8)
        with skinny_gemm_forced(False):
            assert few_adapter_captures(LoRAConfig(), cpu) == ((), 0)
        assert skinny_gemm_switch() == "1"
    assert skinny_gemm_switch() == before


def test_refuses_backends_that_cannot_be_captured(tiny_llava: Path) -> None:
    model = make_model(tiny_llava, "torch", torch.device("cpu"), torch.float32, [])
    with pytest.raises(ValoraError, match="cannot be captured"):
        CudaGraphRunner(model, 4, max_context=16, page_size=PAGE_SIZE)
    fast = make_model(tiny_llava, "triton", DEVICE, torch.float32, [])
    with pytest.raises(ValoraError, match="variants"):
        CudaGraphRunner(fast, 4, max_context=16, page_size=PAGE_SIZE, variants=("lora",))


def _engine_mixed_slots(count: int, merged: int) -> list[tuple[int, int]]:
    """(own, correction) slots as the engine plans a mixed step: the merged adapter's rows carry
    neither, base rows the correction, other adapters' rows both."""
    return [(-1, -1) if i % 4 == 0 else (-1, merged) if i % 4 == 1 else (i % 3, merged)
            for i in range(count)]


@pytest.mark.gpu
@pytest.mark.parametrize(("overlap", "fuse", "few"),
                         [(0, False, 0), (64, False, 0), (0, True, 0), (64, True, 0),
                          (64, False, 4)],
                         ids=["serial", "lora-overlap", "serial-fused", "lora-overlap-fused",
                              "lora-overlap-few-adapters"])
def test_gpu_graphs_match_eager_and_survive_adapter_changes(tiny_llava: Path, overlap: int,
                                                           fuse: bool, few: int) -> None:
    """With ``overlap``, the graphed model's LoRA deltas (prefill and captured decode) run on
    the side stream; the eager reference runs them in series. With ``fuse``, the captured
    ``mixed`` graph runs the correction inside each LoRA op (engine-planned slots). With
    ``few``, bucket 16's ``"lora"`` graph is captured a second time with the base GEMM forced
    to cuBLAS and replayed for the (4-adapter) lora steps."""
    ranks = [8, 2, 5, 7]
    graphed = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    graphed.set_lora_overlap(overlap, priority=-1 if overlap else 0)
    eager = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    # 11 sequences (bucket 16, padded), some subtracting a merged adapter: the "mixed" graph.
    slots = (_engine_mixed_slots(11, 3) if fuse
             else [(i % 5 - 1, 3 if i % 3 == 0 and not few else -1) for i in range(11)])
    runner = CudaGraphRunner(graphed, 16, max_context=128, page_size=PAGE_SIZE,
                             num_lora_slots=NUM_SLOTS, variants=("base", "lora", "mixed"),
                             fuse_correction=fuse, few_adapter_buckets=(16,) if few else (),
                             few_adapter_max=few)
    assert ((16, FEW_ADAPTERS) in runner._entries) == bool(few)
    replayed: list[tuple[int, str]] = []
    entry_key = runner.entry_key

    def recording(batch: ForwardBatch, size: int) -> tuple[int, str]:
        replayed.append(entry_key(batch, size))
        return replayed[-1]

    runner.entry_key = recording  # type: ignore[method-assign]
    fast_steps = Stepper(graphed, 600, PAGE_SIZE, NUM_SLOTS, "triton")
    slow_steps = Stepper(eager, 600, PAGE_SIZE, NUM_SLOTS, "triton")
    fast_seqs, slow_seqs = prompts(graphed, 11, slots), prompts(eager, 11, slots)
    fast_steps.greedy(fast_seqs, 0, 8)  # prefill before capture: graphs never see it
    slow_steps.greedy(slow_seqs, 0, 8)
    runner.capture()
    graphs = {key: entry.graph for key, entry in runner._entries.items()}
    assert all(g is not None for g in graphs.values())
    for round_ in range(2):
        got, got_logits = fast_steps.greedy(fast_seqs, 6, 8, runner)
        want, want_logits = slow_steps.greedy(slow_seqs, 6, 8)
        assert got == want
        for a, b in zip(got_logits, want_logits, strict=True):
            assert rel_err(a, b) < 1e-4
        fill_slots(graphed, [4, 8, 1, 6], seed=20 + round_)  # new adapters, same storage
        fill_slots(eager, [4, 8, 1, 6], seed=20 + round_)
    assert {key: entry.graph for key, entry in runner._entries.items()} == graphs
    assert ((16, FEW_ADAPTERS) in replayed) == bool(few)


@pytest.mark.gpu
@pytest.mark.parametrize(("slots", "fuse"), [
    ([(-1, 3)] * 3, False), ([(-1, 3)] * 3, True), ([(0, 3), (-1, 3), (-1, -1), (2, 3)], True)],
    ids=["correction-only", "correction-only-fused", "mixed-fused"])
def test_gpu_correction_only_steps_replay_the_mixed_graph(
        tiny_llava: Path, slots: list[tuple[int, int]], fuse: bool) -> None:
    """Base-model rows while slot 3 is merged carry only the correction launch: they replay the
    ``mixed`` graph (every token slot -1) and match the eager forward; with ``fuse_correction``
    the captured graph runs one LoRA op per layer (also for a whole mixed step)."""
    ranks = [8, 2, 5, 7]
    graphed = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    eager = make_model(tiny_llava, "triton", DEVICE, torch.float32, ranks)
    runner = CudaGraphRunner(graphed, 4, max_context=128, page_size=PAGE_SIZE,
                             num_lora_slots=NUM_SLOTS, variants=("base", "lora", "mixed"),
                             fuse_correction=fuse)
    fast_steps = Stepper(graphed, 200, PAGE_SIZE, NUM_SLOTS, "triton")
    slow_steps = Stepper(eager, 200, PAGE_SIZE, NUM_SLOTS, "triton")
    fast_seqs = prompts(graphed, len(slots), slots)
    slow_seqs = prompts(eager, len(slots), slots)
    fast_steps.greedy(fast_seqs, 0, 8)
    slow_steps.greedy(slow_seqs, 0, 8)
    runner.capture()
    got, got_logits = fast_steps.greedy(fast_seqs, 4, 8, runner)  # asserts runner.can_run
    want, want_logits = slow_steps.greedy(slow_seqs, 4, 8)
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel_err(a, b) < 1e-4
