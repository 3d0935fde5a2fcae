"""The default model's data generators: deterministic, unambiguous, and encoded exactly as the
inference path (chat template + LlavaProcessor) would encode them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from valora.training.default_aux import NUM_TARGETS, patch_targets
from valora.training.default_data import (
    choose_turns,
    encode_packed,
    make_batch,
    pixel_values,
    training_example,
)
from valora.training.default_eval import EVAL_COUNTS, EVAL_SEED_BASE, eval_set, prompt
from valora.training.default_model import DefaultModelSpec, build_config, build_processor
from valora.training.default_tokenizer import build_default_tokenizer
from valora.training.scenes import SHAPES, generate_scene

SPEC = DefaultModelSpec()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_default_tokenizer(SPEC.vocab_size)


def test_scenes_are_a_function_of_the_seed() -> None:
    for seed in (0, 7, 123_456):
        a, b = generate_scene(seed), generate_scene(seed)
        assert a.qas == b.qas and a.objects == b.objects
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.mask is not None and b.mask is not None and np.array_equal(a.mask, b.mask)
    assert generate_scene(1).qas != generate_scene(2).qas


def test_batches_are_deterministic(tokenizer: PreTrainedTokenizerFast) -> None:
    first = make_batch(tokenizer, 3, range(40, 48), SPEC.image_size, SPEC.patch_size, 6)
    again = make_batch(tokenizer, 3, range(40, 48), SPEC.image_size, SPEC.patch_size, 6)
    other = make_batch(tokenizer, 4, range(40, 48), SPEC.image_size, SPEC.patch_size, 6)
    for name in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values",
                 "patch_targets"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.pixel_values, other.pixel_values)


def test_tokenizer_training_is_deterministic(tokenizer: PreTrainedTokenizerFast) -> None:
    assert build_default_tokenizer(SPEC.vocab_size).get_vocab() == tokenizer.get_vocab()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}


def test_shape_questions_are_unambiguous() -> None:
    for seed in range(200):
        example = generate_scene(seed, "shapes")
        shapes = [o.what for o in example.objects]
        colours = [o.colour for o in example.objects]
        for qa in example.qas:
            if qa.kind == "colour":
                shape = qa.question.removeprefix("What colour is the ").removesuffix("?")
                assert shapes.count(shape) == 1
                assert colours[shapes.index(shape)] == qa.answer
            if qa.kind == "shape":
                colour = qa.question.removeprefix("What shape is ").removesuffix("?")
                assert colours.count(colour) == 1 and shapes[colours.index(colour)] == qa.answer
            if qa.kind == "count":
                assert qa.answer == str(len(shapes))
        assert all(s in SHAPES for s in shapes)


def test_eval_set_is_fixed_and_disjoint_from_training() -> None:
    items = eval_set()
    assert len(items) == sum(count for _, count in EVAL_COUNTS.values()) == 100
    assert [(i.question, i.answer) for i in items] == [(i.question, i.answer) for i in eval_set()]
    # training scene seeds are reduced modulo EVAL_SEED_BASE, evaluation seeds start there
    train_pixels = {np.asarray(training_example(0, i).image).tobytes() for i in range(300)}
    assert not any(np.asarray(i.image).tobytes() in train_pixels for i in items)
    assert EVAL_SEED_BASE == 1_000_000_000


def test_patch_targets_mark_one_centre_per_object() -> None:
    grid = SPEC.image_size // SPEC.patch_size
    for seed in range(50):
        example = generate_scene(seed, "shapes")
        targets = patch_targets(example, SPEC.image_size, SPEC.patch_size)
        assert targets.shape == (NUM_TARGETS, grid * grid)
        assert 1 <= int((targets[2] == 1).sum()) <= len(example.objects)
        assert set(np.unique(targets[1])) <= set(range(-100, 40))


def test_packed_chats_match_the_processor(tokenizer: PreTrainedTokenizerFast) -> None:
    """Each packed branch equals the processor's encoding of that question's single-turn chat."""
    processor = build_processor(SPEC, tokenizer)
    example = generate_scene(11, "shapes")
    turns = choose_turns(example, random.Random(0), 6)
    packed = encode_packed(tokenizer, turns, SPEC.num_image_tokens, bos=False)
    for branch, qa in enumerate(turns, start=1):
        keep = [i for i, s in enumerate(packed.segments) if s in (0, branch)]
        ids = [packed.input_ids[i] for i in keep]
        chat = prompt(processor, qa.question) + f" {qa.answer}</s>"
        encoded = processor(images=[example.image], text=[chat], return_tensors="pt")
        assert encoded["input_ids"][0].tolist() == ids
        assert [packed.positions[i] for i in keep] == list(range(len(ids)))
        assert torch.allclose(encoded["pixel_values"], pixel_values([example.image]), atol=1e-5)


def test_packed_branches_compute_like_separate_chats(tokenizer: PreTrainedTokenizerFast) -> None:
    """The block mask + restarted positions give each branch the logits it has alone."""
    spec = DefaultModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, vision_hidden=32, vision_intermediate=64,
                            vision_layers=1, vision_heads=2)
    config = build_config(spec, tokenizer)
    assert isinstance(config.text_config, LlamaConfig)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    batch = make_batch(tokenizer, 0, [5, 6], spec.image_size, spec.patch_size, 4)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, pixel_values=batch.pixel_values).logits
        for row in range(2):
            ids, labels = batch.input_ids[row], batch.labels[row]
            starts = [i for i in range(1, len(labels)) if labels[i] >= 0 > labels[i - 1]]
            assert len(starts) >= 2
            for start in starts:
                visible = batch.attention_mask[row, 0, start - 1]
                alone_ids = ids[visible][None]
                alone = model(input_ids=alone_ids, pixel_values=batch.pixel_values[row : row + 1])
                assert torch.allclose(alone.logits[0, -1], packed[row, start - 1], atol=1e-4)
