"""Train valora's embedded default model from scratch and write it in Hugging Face format.

    python scripts/train_default_model.py                       # the shipped recipe (CPU, 2 threads)
    python scripts/train_default_model.py --out /tmp/m --set steps=200 --set hidden_size=128

Everything is generated or bundled offline (see docs/default_model.md). The run is deterministic in
``--set seed=N``; it resumes from ``--work-dir/checkpoint.pt`` when interrupted. At the end it
evaluates the saved weights (as loaded back from disk) on the fixed visual-question set and records
the result in ``valora_default_model.json`` next to the weights.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: on a shared machine, spinning worker threads that lose their core make
# every parallel region wait for a descheduled thread (measured 10x slower under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from valora.training.default_eval import (
    READING_COUNTS,
    eval_set,
    evaluate,
    handwritten_eval_set,
)
from valora.training.default_model import DefaultModelSpec, save_default_model
from valora.training.default_tokenizer import build_default_tokenizer
from valora.training.default_train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _override(obj: Any, assignments: list[str]) -> Any:
    """Apply ``key=value`` pairs whose key is a field of ``obj`` (values typed like the field)."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        if key in names:
            kind = type(getattr(obj, key))
            changes[key] = kind(value)
    return dataclasses.replace(obj, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "valora/assets/default_model")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build/default_model_work")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DefaultModelSpec or TrainConfig field")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("valora.train_default_model")
    known = {f.name for f in dataclasses.fields(DefaultModelSpec)}
    known |= {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [a for a in args.set if a.partition("=")[0] not in known]
    if unknown:
        parser.error(f"unknown --set keys: {unknown}; known: {sorted(known)}")
    spec = _override(DefaultModelSpec(), args.set)
    config = _override(TrainConfig(), args.set)
    torch.set_num_threads(args.threads)
    log.info("spec %s", spec)
    log.info("config %s", config)

    began = time.monotonic()
    tokenizer = build_default_tokenizer(spec.vocab_size)
    model = train(spec, config, tokenizer, args.work_dir)
    train_seconds = time.monotonic() - began
    extra: dict[str, object] = {
        "train_config": dataclasses.asdict(config), "train_seconds": round(train_seconds, 1),
        "threads": args.threads, "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
    }
    save_default_model(model.cpu(), tokenizer, spec, args.out, DTYPES[args.dtype], extra)

    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    loaded = LlavaForConditionalGeneration.from_pretrained(str(args.out)).eval()
    processor = LlavaProcessor.from_pretrained(str(args.out))
    report = evaluate(loaded, processor, eval_set())
    handwritten = evaluate(loaded, processor, handwritten_eval_set())
    reading = evaluate(loaded, processor, eval_set(READING_COUNTS))
    log.info("eval accuracy %.3f per kind %s", report.accuracy, report.per_kind)
    log.info("held-out handwritten digits accuracy %.3f", handwritten.accuracy)
    log.info("printed-word reading accuracy %.3f", reading.accuracy)
    for question, expected, got in report.mistakes:
        log.info("wrong: %r expected %r got %r", question, expected, got)
    info_path = args.out / "valora_default_model.json"
    info = json.loads(info_path.read_text())
    info["eval"] = {"accuracy": report.accuracy, "per_kind": report.per_kind,
                    "num_questions": report.num_questions,
                    "handwritten_heldout_accuracy": handwritten.accuracy,
                    "word_reading_accuracy": reading.accuracy}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log.info("wrote %s in %.0fs", args.out, time.monotonic() - began)


if __name__ == "__main__":
    main()
