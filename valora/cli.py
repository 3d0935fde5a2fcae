"""The ``valora`` command: ``generate``, ``serve``, ``tune-kernels``, ``adapters build``, ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from valora.cli_config import add_engine_flags, engine_kwargs, parse_lora_modules


def _cmd_generate(args: argparse.Namespace) -> int:
    from valora.engine.inputs import GenerateRequest
    from valora.engine.llm import LLM
    from valora.sampling_params import SamplingParams

    llm = LLM(**engine_kwargs(args), adapters=parse_lora_modules(args.lora_modules))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    content: list[dict[str, Any]] = [{"type": "image"} for _ in args.image]
    content.append({"type": "text", "text": args.prompt})
    request = GenerateRequest(
        messages=[{"role": "user", "content": content}],
        images=list(args.image),
        adapter=args.adapter,
        sampling_params=params,
    )
    output = llm.generate([request])[0]
    if args.json:
        completion = output.outputs[0]
        json.dump(
            {
                "text": completion.text,
                "token_ids": completion.token_ids,
                "finish_reason": completion.finish_reason,
                "head_result": completion.head_result,
                "latency_s": output.metrics.latency_s,
                "time_to_first_token_s": output.metrics.time_to_first_token_s,
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
    else:
        sys.stdout.write(output.text + "\n")
    return 0


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        main: Callable[[list[str]], int] = importlib.import_module(module).main
        return main(list(args.rest))

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valora", description=__doc__)
    parser.add_argument(
        "--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="answer one prompt (optionally with images and an adapter)"
    )
    gen.add_argument("prompt", nargs="?", default="Describe the image.")
    gen.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    gen.add_argument("--adapter", default=None, help="adapter name (from --lora-modules)")
    gen.add_argument("--lora-modules", action="append", default=[], metavar="NAME=PATH")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument(
        "--json", action="store_true", help="print a JSON object instead of plain text"
    )
    add_engine_flags(gen, skip=("seed",))
    gen.set_defaults(func=_cmd_generate)

    for name, module, help_text in (
        ("serve", "valora.server.cli", "OpenAI-compatible HTTP server"),
        ("tune-kernels", "valora.ops.tuning", "profile ATMM tile configs on this GPU"),
        (
            "adapters",
            "valora.training.cli",
            "accuracy-aware adapter generation (adapters build SPEC)",
        ),
        ("bench", "valora.bench_cli", "benchmarks (bench serve ...)"),
        ("profile-modes", "valora.orchestrator.profile_cli", "profile the mode cost model here"),
    ):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module))
    return parser


DELEGATED = {
    "serve": "valora.server.cli",
    "tune-kernels": "valora.ops.tuning",
    "adapters": "valora.training.cli",
    "bench": "valora.bench_cli",
    "profile-modes": "valora.orchestrator.profile_cli",
}


def _split_delegated(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """``[global options] COMMAND rest`` for a delegated COMMAND, else ``None``: its own parser
    takes every word after it (argparse's REMAINDER would refuse leading options)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--log-level":
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        return (argv[:i], word, argv[i + 1 :]) if word in DELEGATED else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = _split_delegated(argv)
    if split is not None:
        head, command, rest = split
        args = build_parser().parse_args([*head, command])
        args.rest = rest
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from valora.errors import ValoraError

    try:
        return int(args.func(args))
    except ValoraError as exc:
        sys.stderr.write(f"valora: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
