"""Pool repeats of one serving grid (``valora bench serve`` JSONL files) into one comparison.

    python bench/orchestrator/pool_grids.py GRID1.jsonl GRID2.jsonl [...] [--policy valora]

Cells match by popularity and rate as a share of each repeat's calibrated capacity; per cell it
prints every policy's pooled mean latency against the best baseline's, a paired bootstrap
interval over all requests, and each repeat's own change (``valora.benchmarks.report.
pooled_comparison``). One short run of a host-bound engine moves by tens of points from repeat
to repeat; pooling is how a ±20 % bar can be read at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from valora.benchmarks.report import pooled_comparison


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", type=Path)
    parser.add_argument("--policy", default="valora")
    parser.add_argument("--bar", type=float, default=0.20)
    args = parser.parse_args()
    grids = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()]
             for path in args.grids]
    print(f"Pooled over {len(grids)} repeats: {', '.join(str(p) for p in args.grids)}\n")
    print(pooled_comparison(grids, args.policy, args.bar) or "(no comparable cells)")


if __name__ == "__main__":
    main()
