"""The training backbone sees exactly what the serving engine will feed the model and the head:
same prompt ids, same pixels; and its shortcuts (cached prefix, cached image features) do not
change the hidden states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from valora.training.backbone import Backbone
from valora.training.spec import TrainingSpec

UPPER_LAYER = r".*language_model.*layers\.1\..*(q_proj|v_proj|down_proj)"


@pytest.fixture(scope="module")
def backbone(tiny_llava: Path) -> Backbone:
    return Backbone(tiny_llava, TrainingSpec(rank=4, alpha=8), seed=0)


def test_prompt_ids_match_the_engine(backbone: Backbone) -> None:
    from valora.multimodal.prompt import build_chat_prompt, expand_image_placeholders

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What colour is it?"}]}]
    text = build_chat_prompt(backbone.tokenizer, messages).text
    engine_ids, _ = expand_image_placeholders(backbone.tokenizer(text).input_ids,
                                              backbone.image_token_id, backbone.num_image_tokens,
                                              ["digest"])
    assert backbone.prompt_ids("What colour is it?") == engine_ids
    answer = backbone.answer_ids("What colour is it?", "red")
    assert answer[-1] == backbone.tokenizer.eos_token_id
    assert backbone.decode_text(answer) == "red"


def test_pixels_match_the_engine(backbone: Backbone, tiny_llava: Path) -> None:
    from valora.multimodal.processor import ImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((20, 28, 3)) * 255).astype("uint8"))
    ours = backbone.processor.image_processor([image], return_tensors="pt")["pixel_values"][0]
    engine = ImageProcessor.from_pretrained(tiny_llava)(image)
    torch.testing.assert_close(ours.float(), engine.float())


def test_cached_prefix_gives_the_same_hidden_states(tiny_llava: Path) -> None:
    upper = Backbone(tiny_llava, TrainingSpec(rank=4, alpha=8, target_modules=UPPER_LAYER), seed=0)
    assert upper.first_adapted_layer == 1
    for param in upper.lora_parameters():
        param.data.normal_(0.0, 0.1)
    ids = torch.tensor([[*upper.prompt_ids("hello"), 7, 8, 9]] * 2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    embeds = upper.embed(ids, torch.randn(2, upper.num_image_tokens, upper.hidden_size))
    full = upper.hidden_states(embeds, mask)
    resumed = upper.hidden_from_prefix(upper.prefix_states(embeds, mask), mask)
    torch.testing.assert_close(resumed[0], full[0])
    torch.testing.assert_close(resumed[1, :-2], full[1, :-2])  # padded tail is don't-care


def test_image_features_match_the_full_model(backbone: Backbone) -> None:
    images = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (9, 13), (10, 90, 200))]
    ids = torch.tensor([backbone.prompt_ids("What colour is it?")] * 2)
    pixels = backbone.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad(), backbone.lora_disabled():
        reference = backbone.llava(input_ids=ids, pixel_values=pixels).last_hidden_state
        cached = backbone.hidden_states(backbone.embed(ids, backbone.image_features(images)),
                                        torch.ones_like(ids))
    torch.testing.assert_close(cached, reference)


def test_no_target_match_is_an_error(tiny_llava: Path) -> None:
    from valora.errors import ModelLoadError

    with pytest.raises((ModelLoadError, ValueError)):
        Backbone(tiny_llava, TrainingSpec(target_modules=r".*vision_tower.*nothing"), seed=0)


def test_head_windows(backbone: Backbone) -> None:
    from valora.training.data import Example, TaskData
    from valora.training.encoding import encode_task
    from valora.training.spec import TaskSpec
    from valora.training.trainer import new_head

    examples = [Example(Image.new("RGB", (8, 8), (i * 60, 0, 0)), "ab"[i % 2]) for i in range(4)]
    prompt = backbone.prompt_ids("Which?")
    image_window = len(prompt) - prompt.index(backbone.image_token_id)
    for head_options, window in (({}, 1), ({"pooling": "mean"}, image_window),
                                 ({"pooling": "mean", "num_input_tokens": 3}, 3)):
        task = TaskSpec(name="t", kind="classification", prompt="Which?", requirement=0.5,
                        head={**head_options, "mlp_hidden": 8})
        encoded = encode_task(backbone, TaskData(task, examples, examples, ("a", "b")))
        head = new_head(encoded, backbone, seed=0)
        assert head.num_input_tokens == window
        assert head.spec.pooling == head_options.get("pooling", "last")


def test_head_refit_trains_on_cached_inputs(backbone: Backbone) -> None:
    from valora.training.data import Example, TaskData
    from valora.training.encoding import encode_task
    from valora.training.evaluate import head_accuracy
    from valora.training.refit import refit_head
    from valora.training.spec import TaskSpec
    from valora.training.trainer import new_head

    colours = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220)}
    examples = [Example(Image.new("RGB", (8, 8), rgb), name)
                for _ in range(6) for name, rgb in colours.items()]
    task = TaskSpec(name="c", kind="classification", prompt="Colour?", requirement=0.5,
                    head={"mlp_hidden": 16})
    encoded = encode_task(backbone, TaskData(task, examples, examples, ("blue", "green", "red")))
    backbone.reset_lora(0)  # B = 0: the plain base model's hidden states
    heads = []
    for _ in range(2):
        head = new_head(encoded, backbone, seed=3)
        refit_head(backbone, encoded, head, steps=60, lr=1e-2, seed=5)
        heads.append(head)
    assert head_accuracy(backbone, encoded, heads[0], batch_size=8) == 1.0
    for a, b in zip(heads[0].parameters(), heads[1].parameters(), strict=True):
        assert torch.equal(a, b)  # seeded: identical heads
