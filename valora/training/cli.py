"""``valora adapters build SPEC [--out DIR] [--base DIR] [--restart] [--threads N] [--device D]
[--jobs N] [--single-only TASK]``.

Exit status: 0 when every task meets its requirement, 1 when the build finished but some task
is below its requirement or failed (everything else is still written), 2 on a spec or input
error that stopped the build (partial results in the output directory are kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# Passive OpenMP waiting (read when torch loads): on a shared CPU, spinning worker threads that
# lose their core stall every parallel region (measured more than 5x slower builds under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from valora.errors import ValoraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valora adapters", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train adapters (+ heads) for the tasks of a spec")
    build.add_argument("spec", type=Path, help="build spec (.toml or .json)")
    build.add_argument("--out", type=Path, default=Path("valora-adapters"),
                       help="output directory (resumes a build already there)")
    build.add_argument("--base", type=Path, default=None,
                       help="LLaVA-format base model directory (default: the spec's, else the "
                            "embedded default model)")
    build.add_argument("--restart", action="store_true", help="discard a previous build in --out")
    build.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    build.add_argument("--device", default="cpu",
                       help="torch device to train on: cpu (default), cuda, cuda:1...")
    build.add_argument("--jobs", type=int, default=1,
                       help="train the single-task adapters in this many processes at once")
    build.add_argument("--single-only", default=None, metavar="TASK",
                       help="only TASK's data, base accuracy and single-task adapter (what each "
                            "--jobs child runs)")
    return parser


def _base_dir(arg: Path | None, spec_base: str | None, resolve: Path) -> Path:
    if arg is not None:
        return arg
    if spec_base is not None:
        path = Path(spec_base).expanduser()
        return path if path.is_absolute() else resolve / path
    from valora.assets import default_model_path

    return Path(default_model_path())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from valora.training.builder import AdapterBuilder
    from valora.training.spec import load_spec

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        spec = load_spec(args.spec)
        base = _base_dir(args.base, spec.base, spec.root)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValoraError(f"--device {args.device}: CUDA is not available")
        builder = AdapterBuilder(spec, args.out, base, restart=args.restart, device=args.device)
        if args.single_only is not None:
            accuracy = builder.run_single_only(args.single_only)
            sys.stdout.write(f"{args.single_only}: single-task accuracy {accuracy:.4f}\n")
            return 0
        if args.jobs > 1:
            from valora.training.parallel import PARTS_DIR, parallel_singles

            if args.restart:
                shutil.rmtree(args.out / PARTS_DIR, ignore_errors=True)
            parallel_singles(args.spec, spec, args.out, base, args.jobs, args.device,
                             args.threads)
            # The children's results are on disk now: resume from them.
            builder = AdapterBuilder(spec, args.out, base, device=args.device)
        outcome = builder.run()
    except ValoraError as exc:
        sys.stderr.write(f"valora adapters: error: {exc}\n")
        return 2
    adapters = outcome.manifest["adapters"]
    sys.stdout.write(f"{len(outcome.manifest['tasks'])} tasks in {len(adapters)} adapters; "
                     f"report: {outcome.out_dir / 'report.md'}\n")
    if outcome.unmet:
        sys.stderr.write(f"valora adapters: below requirement or failed: {', '.join(outcome.unmet)}"
                         " (see the report)\n")
        return 1
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
