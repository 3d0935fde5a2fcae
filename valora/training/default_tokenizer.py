"""The default model's tokenizer: byte-level BPE trained on the training data's own text.

The corpus is every question, answer and caption the data generators can produce (scene
templates over all shapes, colours, counts, digits and words; photo labels and captions) plus a
little general English, so each word the model is trained on is one token while any other text
still encodes through the 256 byte tokens. Training the BPE is deterministic: same corpus and
vocabulary size → same vocabulary and merges.

Special tokens and their ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (end of turn / EOS), ``<pad>`` 3,
``<image>`` 4 (the image placeholder the processor expands to one token per image patch).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from valora.training.default_real import PHOTOS
from valora.training.scenes import COLOURS, NUMBER_WORDS, SHAPES, WORDS

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = ("<unk>", "<s>", EOS_TOKEN, "<pad>", IMAGE_TOKEN)

# "USER: <image>\n{question}\nASSISTANT: {answer}</s>\n"; the generation prompt ends in "ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_GENERAL_TEXT = """
USER: ASSISTANT: yes no I do not know. Please describe what you see in this picture.
What is this? What is in the image? Describe the image. Answer with one word. Thank you.
The image shows a photo, a drawing, a picture, text, a number, letters, shapes and colours.
Where is it? Which one is bigger? Is it on the left, on the right, at the top or at the bottom?
black white grey gray brown pink colour color object objects left right top bottom middle centre
"""


def training_corpus() -> list[str]:
    """Deterministic list of lines covering the vocabulary of every data generator."""
    lines = [_GENERAL_TEXT] * 4 + ["USER: Is it?\nASSISTANT: yes</s>\nUSER: Is there?\nASSISTANT:"] * 20
    colour_names, numbers = list(COLOURS), [str(n) for n in range(10)]
    for shape in SHAPES:
        lines.append(f"What colour is the {shape}? Where is the {shape}? Is there a {shape}?")
        lines.append(f"How many {shape}s are there? Is the {shape} left or right of the star?")
        for colour in colour_names:
            article = "an" if colour[0] in "aeiou" else "a"
            lines.append(f"What shape is {colour}? {article} {colour} {shape}, {colour} {shape}.")
    lines += ["How many shapes are there? " + " ".join(numbers + list(NUMBER_WORDS))] * 4
    lines += [f"What digit is shown? The digit {n} written in {c}." for n in numbers
              for c in colour_names]
    lines += [f"What word is written? The word {w} written in {c}." for w in WORDS
              for c in colour_names]
    lines += ["What colour is the digit? What colour is the text? top left top right bottom left"
              " bottom right"] * 4
    lines += [f"A handwritten digit {n}." for n in numbers]
    for photo in PHOTOS:
        lines += [f"What is in the image? {photo.label}. {photo.caption}"] * 2
    return lines


def build_default_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``training_corpus()``; specials get ids 0..4 in order."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=EOS_TOKEN,
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
