"""The default model's training stream: seeded examples → packed chats → token/label tensors.

Example ``i`` of a run with seed ``s`` is a pure function of ``(s, i)``: its source (generated
scene, bundled photo or handwritten digit, by ``SOURCE_WEIGHTS``), its image and the questions
asked. Each question becomes a single-turn chat in the format of ``default_tokenizer``::

    [<s>]USER: <image>\\n{question}\\nASSISTANT: {answer}</s>

and the chats about one image are packed into one row behind their shared prefix (up to
``<image>\\n``) with a block attention mask and restarted positions: the image's tokens are paid
for once, yet every chat is computed exactly as alone (no chat sees another's answer, which would
let the model copy answers from text instead of looking). Only answer tokens and ``</s>`` carry a
loss (labels elsewhere are -100). ``<s>`` starts half of the rows so the model answers the same
whether or not a caller's tokenizer path adds it. ``<image>`` is expanded to
``num_image_tokens`` copies, as ``LlavaProcessor`` does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from valora.training.default_aux import patch_targets
from valora.training.default_model import CLIP_MEAN, CLIP_STD, image_token_id
from valora.training.default_real import handwritten_digit_example, photo_example
from valora.training.default_tokenizer import IMAGE_TOKEN
from valora.training.scenes import QA, Example, generate_scene

SOURCE_WEIGHTS = (("scene", 0.80), ("photo", 0.08), ("handwritten", 0.12))
IGNORE_INDEX = -100


def training_example(seed: int, index: int) -> Example:
    """Example ``index`` of the stream seeded by ``seed`` (scene seeds stay below 10**9)."""
    rng = random.Random(f"default-data:{seed}:{index}")
    source = rng.choices([s for s, _ in SOURCE_WEIGHTS], [w for _, w in SOURCE_WEIGHTS])[0]
    if source == "scene":
        return generate_scene((seed * 7919 + index) % 1_000_000_000)
    if source == "photo":
        return photo_example(rng)
    return handwritten_digit_example(rng)


def choose_turns(example: Example, rng: random.Random, max_turns: int) -> list[QA]:
    """Up to ``max_turns`` distinct questions, spread over question kinds (one per kind first)."""
    by_kind: dict[str, list[QA]] = {}
    for qa in example.qas:
        by_kind.setdefault(qa.kind, []).append(qa)
    pools = [rng.sample(qas, len(qas)) for qas in by_kind.values()]
    rng.shuffle(pools)
    turns: list[QA] = []
    while len(turns) < max_turns and any(pools):
        for pool in pools:
            if pool and len(turns) < max_turns:
                turns.append(pool.pop())
    return turns


@dataclass(frozen=True)
class PackedChats:
    """Several single-turn chats about one image, packed behind one shared prefix.

    ``segments`` is 0 on the shared prefix ``[<s>]USER: <image>×N\n`` and ``k`` on branch ``k``
    (``{question}\nASSISTANT: {answer}</s>``); ``positions`` restart after the prefix in every
    branch, so each branch sees exactly the tokens and positions of its own single-turn chat.
    """

    input_ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]


def encode_packed(
    tokenizer: PreTrainedTokenizerFast, turns: Sequence[QA], num_image_tokens: int, bos: bool
) -> PackedChats:
    """Tokenise piecewise (equal to tokenising each whole chat; tested), image expanded."""
    image_id = image_token_id(tokenizer)
    prefix: list[int] = [int(tokenizer.bos_token_id)] if bos else []
    for token in tokenizer.encode(f"USER: {IMAGE_TOKEN}\n"):
        prefix.extend([image_id] * num_image_tokens if token == image_id else [token])
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    positions, segments = list(range(len(prefix))), [0] * len(prefix)
    for branch, qa in enumerate(turns, start=1):
        question = tokenizer.encode(f"{qa.question}\nASSISTANT:")
        answer = tokenizer.encode(f" {qa.answer}{tokenizer.eos_token}")
        ids += question + answer
        labels += [IGNORE_INDEX] * len(question) + answer
        positions += range(len(prefix), len(prefix) + len(question) + len(answer))
        segments += [branch] * (len(question) + len(answer))
    return PackedChats(ids, labels, positions, segments)


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, and a branch sees only the prefix and itself (-1 = padding,
    which sees only itself so no attention row is empty)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    visible = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    visible |= torch.eye(length, dtype=torch.bool)
    return visible[:, None]


def pixel_values(images: Sequence[Image.Image]) -> torch.Tensor:
    """CLIP-normalised (N, 3, H, W) float32 for images already at the model's size."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    normalised = (array / 255.0 - mean) / std
    return torch.from_numpy(normalised).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Batch:
    """Right-padded training batch for ``LlavaForConditionalGeneration.forward``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # (B, 1, T, T) bool, see ``branch_mask``
    position_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    patch_targets: torch.Tensor  # (B, 3, num_image_tokens), see default_aux


def make_batch(
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    indices: Sequence[int],
    image_size: int,
    patch_size: int,
    max_turns: int,
) -> Batch:
    """The batch of stream examples ``indices`` (deterministic in ``seed`` and ``indices``)."""
    num_image_tokens = (image_size // patch_size) ** 2
    chats: list[PackedChats] = []
    images: list[Image.Image] = []
    targets: list[np.ndarray] = []
    for index in indices:
        example = training_example(seed, index)
        rng = random.Random(f"turns:{seed}:{index}")
        turns = choose_turns(example, rng, max_turns)
        chats.append(encode_packed(tokenizer, turns, num_image_tokens, bos=rng.random() < 0.5))
        images.append(example.image)
        targets.append(patch_targets(example, image_size, patch_size))
    length = max(len(chat.input_ids) for chat in chats)
    shape = (len(chats), length)
    input_ids = torch.full(shape, tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    for row, chat in enumerate(chats):
        used = len(chat.input_ids)
        input_ids[row, :used] = torch.tensor(chat.input_ids)
        labels[row, :used] = torch.tensor(chat.labels)
        positions[row, :used] = torch.tensor(chat.positions)
        segments[row, :used] = torch.tensor(chat.segments)
    return Batch(input_ids, branch_mask(segments), positions, labels, pixel_values(images),
                 torch.from_numpy(np.stack(targets)))
