"""Incremental detokenisation: the text built from short windows equals decoding the whole output
at once, for any split of the tokens into steps (byte-level pieces, special tokens, stop strings)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from valora.engine.detokenizer import IncrementalDetokenizer, fast_decoder
from valora.testing.tokenizer import build_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "valora" / "assets" / "default_model"
SAMPLES = ["héllo wörld 42 ✓ 日本語 ok.", "A purple star.  Two  spaces\nnew line", "ß∂ƒ©˙∆˚¬…æ",
           "digits 0123456789 and symbols !@#$%^&*()"]


@pytest.fixture(scope="module", params=["default_model", "testing"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    if request.param == "default_model":
        return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    return build_tokenizer()


def _ids(tokenizer: Any, rng: random.Random) -> list[int]:
    ids: list[int] = []
    for _ in range(rng.randint(1, 4)):
        ids += tokenizer.encode(rng.choice(SAMPLES), add_special_tokens=False)
        if rng.random() < 0.3:
            ids.append(rng.choice(tokenizer.all_special_ids))
    if rng.random() < 0.5:
        ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 20))]
    return ids


@pytest.mark.parametrize("seed", range(40))
def test_incremental_text_equals_full_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    ids = _ids(tokenizer, rng)
    detok = IncrementalDetokenizer(tokenizer)
    streamed, i = "", 0
    while i < len(ids):
        step = rng.choice([1, 1, 1, 2, 5])
        assert detok.add_tokens(ids[i:i + step]) is None
        streamed += detok.take_delta()
        i += step
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if not full.endswith("\ufffd"):  # an unfinished character is withheld until it completes
        assert detok.text == full
        assert streamed == full


def test_stop_string_found_across_steps(tokenizer: Any) -> None:
    ids = tokenizer.encode("the answer is seven. More text", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=("seven.",))
    matched = None
    for token in ids:
        matched = detok.add_tokens([token])
        if matched:
            break
    assert matched == "seven."
    assert detok.text == "the answer is "


class _CountingTokenizer:
    """Forwards ``decode`` and counts the tokens it was given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.decoded_tokens = inner, 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded_tokens += len(ids)
        text: str = self.inner.decode(ids, **kwargs)
        return text


def test_work_per_step_does_not_grow_with_the_output(tokenizer: Any) -> None:
    ids = tokenizer.encode(" ".join(SAMPLES) * 20, add_special_tokens=False)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    for token in ids:
        detok.add_tokens([token])
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded_tokens < 8 * len(ids)  # whole-output decoding would be ~len²/2


@pytest.mark.parametrize("skip", [True, False])
def test_fast_decoder_equals_the_tokenizers_decode(tokenizer: Any, skip: bool) -> None:
    """The direct Rust-tokenizer path gives ``tokenizer.decode``'s text exactly (special tokens
    kept or skipped, random ids included)."""
    decode = fast_decoder(tokenizer, skip)
    assert decode.__name__ == "direct"  # both test tokenizers take it
    rng = random.Random(5)
    for _ in range(50):
        ids = _ids(tokenizer, rng)
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_fast_decoder_keeps_the_generic_path_where_decode_does_more(tokenizer: Any) -> None:
    """A clean-up pass on (``clean_up_tokenization_spaces``) or a tokenizer without a Rust
    backend: ``tokenizer.decode`` itself."""
    assert fast_decoder(_CountingTokenizer(tokenizer), True).__name__ == "generic"
    saved = tokenizer.clean_up_tokenization_spaces
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert fast_decoder(tokenizer, True).__name__ == "generic"
    finally:
        tokenizer.clean_up_tokenization_spaces = saved
