"""``valora bench``: benchmarks. ``valora bench serve`` replays a serving workload (Poisson or
bursty gamma arrivals, or a JSONL trace; uniform / Zipf / one-hot adapter popularity; image
questions with short or long answers and multi-frame requests) against an in-process engine per
mode policy, or against a running server (``--url``, loopback only), and writes JSONL rows, a
Markdown summary and a plot under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from valora.cli_config import add_engine_flags, engine_kwargs
from valora.errors import ValoraError

ENGINE_FLAGS_SKIPPED = ("mode_policy", "seed")


def _popularity(text: str) -> object:
    from valora.benchmarks.serve import Popularity

    kind, _, value = text.partition(":")
    try:
        if kind == "uniform" and not value:
            return Popularity("uniform")
        if kind == "zipf":
            alpha = float(value or 1.0)
            if alpha > 0:
                return Popularity("zipf", alpha)
        if kind == "hot":
            share = float(value or 0.7)
            if 0 < share < 1:
                return Popularity("one-hot", share)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"popularity must be uniform, zipf[:ALPHA>0] or hot[:SHARE in (0,1)], got {text!r}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _kind_mix(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"--kind-mix expects SHORT,LONG,FRAMES weights (non-negative), got {text!r}")
    return (values[0], values[1], values[2])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valora bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serving benchmark (latency vs rate per mode policy)")
    work = serve.add_argument_group("workload")
    work.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    work.add_argument("--cv", type=_positive_float, default=3.0,
                      help="gamma arrivals: coefficient of variation of the gaps (2-4 is bursty)")
    work.add_argument("--trace", type=Path, default=None,
                      help="replay a JSONL trace (arrival_s, adapter, output_tokens, ...)")
    work.add_argument("--rates", type=_positive_float, nargs="+", default=[1.0, 2.0, 4.0],
                      help="request rates to sweep (req/s)")
    work.add_argument("--popularity", type=_popularity, nargs="+",
                      default=[_popularity("zipf:1"), _popularity("hot:0.7")],
                      help="skews to sweep: uniform, zipf:ALPHA, hot:SHARE")
    work.add_argument("--num-adapters", type=int, default=16,
                      help="random adapters to create when --lora-modules is not given")
    work.add_argument("--adapter-ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    work.add_argument("--adapter-cache-dir", type=Path, default=None)
    work.add_argument("--adapter-std", type=_positive_float, default=0.1,
                      help="std of the random adapters' factors")
    work.add_argument("--lora-modules", nargs="+", action="extend", default=[],
                      metavar="NAME=PATH", help="serve these adapters instead of random ones")
    work.add_argument("--kind-mix", type=_kind_mix, default=(0.6, 0.3, 0.1),
                      help="weights of short,long,frames requests (default 0.6,0.3,0.1)")
    work.add_argument("--num-frames", type=int, default=4, help="images per frames request")
    work.add_argument("--num-requests", type=int, default=32, help="requests per run")
    work.add_argument("--rates-of-capacity", type=_positive_float, nargs="+", default=None,
                      metavar="FRACTION",
                      help="measure capacity with a burst on the first policy's engine and sweep "
                           "these fractions of it instead of --rates (e.g. 0.3 0.6 0.9)")
    work.add_argument("--calibration-requests", type=int, default=48,
                      help="requests in the capacity burst (--rates-of-capacity)")
    work.add_argument("--run-budget-s", type=_positive_float, default=None,
                      help="with --rates-of-capacity: choose requests per run so the runs' "
                           "nominal durations sum to this many seconds")
    work.add_argument("--seed", type=int, default=0)
    run = serve.add_argument_group("run")
    run.add_argument("--policies", default="valora,unmerged-fcfs,dlora,merged-only",
                     help="comma-separated mode policies to compare (in-process)")
    run.add_argument("--url", default=None,
                     help="benchmark a running server at http://127.0.0.1:PORT instead")
    run.add_argument("--api-key", default=None,
                     help="with --url: bearer token for a server started with --api-key "
                          "(default: $VALORA_API_KEY, else $OPENAI_API_KEY)")
    run.add_argument("--out", type=Path, default=Path("bench/results/serve"))
    run.add_argument("--name", default="serve", help="result files: NAME.jsonl/.md/.png")
    run.add_argument("--note", default="", help="a sentence added to the Markdown summary")
    run.add_argument("--warmup-requests", type=int, default=2)
    run.add_argument("--shared-engine", action="store_true",
                     help="in-process: one engine for every policy, the policies taking turns "
                          "inside each (skew, rate) cell (no process history in the comparison)")
    run.add_argument("--repeats", type=int, default=1,
                     help="with --shared-engine: run the grid this many times on the engine "
                          "and pool the comparison (rows tagged 'repeat')")
    run.add_argument("--step-trace", action="store_true",
                     help="in-process: each result row lists every step of its run (start, "
                          "seconds, graphed, rows, tokens, LoRA ops per linear, weights' mode)")
    run.add_argument("--deadline-s", type=_positive_float, default=None,
                     help="skip runs that would start after this many seconds of the sweep")
    run.add_argument("--no-plot", action="store_true")
    add_engine_flags(serve, skip=ENGINE_FLAGS_SKIPPED)
    serve.set_defaults(command_parser=serve)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Validate what argparse cannot; returns the policies (``parser.error`` exits with 2)."""
    from valora.orchestrator.policies import available_mode_policies

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    known = available_mode_policies()
    unknown = [p for p in policies if p not in known]
    if not policies or unknown:
        parser.error(f"--policies: unknown {unknown or 'empty list'}; known: {', '.join(known)}")
    if args.url is not None:
        from valora.benchmarks.http_driver import check_loopback

        if len(policies) != 1:
            parser.error("--url: the server runs one policy; give exactly one --policies label")
        check_loopback(args.url)
        if args.shared_engine or args.step_trace:
            parser.error("--shared-engine and --step-trace run in-process; not with --url")
    if args.repeats < 1 or (args.repeats > 1 and not args.shared_engine):
        parser.error("--repeats must be >= 1, and above 1 needs --shared-engine")
    if args.rates_of_capacity is not None and args.calibration_requests < 1:
        parser.error("--calibration-requests must be at least 1")
    if args.num_requests < 1 or args.num_adapters < 1 or args.num_frames < 1:
        parser.error("--num-requests, --num-adapters and --num-frames must be at least 1")
    if any(rank < 1 for rank in args.adapter_ranks):
        parser.error("--adapter-ranks must be positive")
    if args.trace is not None and not args.trace.is_file():
        parser.error(f"--trace: no such file {args.trace}")
    return policies


def _adapters(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, int]]:
    from valora.benchmarks.adapters import parse_modules, random_adapters

    if args.lora_modules:
        paths = parse_modules(args.lora_modules)
    else:
        paths = random_adapters(args.model, args.num_adapters, args.adapter_ranks,
                                args.adapter_cache_dir, std=args.adapter_std)
    ranks = {}
    for name, path in paths.items():
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks[name] = int(config["r"])
    return paths, ranks


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from valora.benchmarks.report import markdown_summary, plot, write_rows
    from valora.benchmarks.serve import ServeBench, run_sweep
    from valora.benchmarks.workload import BenchWorkload, load_trace

    policies = _check(parser, args)
    try:
        paths, ranks = _adapters(args)
    except (ValueError, OSError, KeyError) as exc:
        parser.error(f"adapters: {exc}")
    workload = BenchWorkload(
        num_requests=args.num_requests, rate_per_s=args.rates[0], adapters=tuple(paths),
        arrival=args.arrival, cv=args.cv, kind_mix=args.kind_mix, num_frames=args.num_frames,
        latency_target_s=args.latency_target_s, seed=args.seed,
    )
    options = engine_kwargs(args)
    options.pop("model", None)
    bench = ServeBench(
        policies=policies, rates=args.rates, popularities=args.popularity, workload=workload,
        adapter_ranks=ranks, model=args.model,
        trace=load_trace(args.trace, tuple(paths)) if args.trace is not None else None,
        url=args.url, warmup_requests=args.warmup_requests, engine_options=options,
        api_key=(args.api_key or os.environ.get("VALORA_API_KEY")
                 or os.environ.get("OPENAI_API_KEY")) if args.url is not None else None,
        capacity_fractions=args.rates_of_capacity,
        calibration_requests=args.calibration_requests, run_budget_s=args.run_budget_s,
        deadline_s=args.deadline_s, shared_engine=args.shared_engine, repeats=args.repeats,
        step_trace=args.step_trace,
    )
    jsonl = args.out / f"{args.name}.jsonl"
    if jsonl.exists():
        jsonl.unlink()

    def append(row: dict[str, object]) -> None:
        write_rows([row], jsonl)

    rows = run_sweep(bench, paths, on_row=append)
    (args.out / f"{args.name}.md").write_text(markdown_summary(rows, args.note))
    if not args.no_plot:
        plot(rows, args.out / f"{args.name}.png")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``valora bench``; returns the exit code (2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    command_parser: argparse.ArgumentParser = args.command_parser
    try:
        return _serve(command_parser, args)
    except ValoraError as exc:
        command_parser.error(str(exc))
