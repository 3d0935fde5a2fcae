"""Per run of a serving grid (``valora bench serve --step-trace`` JSONL): where the time went.

    python bench/orchestrator/step_trace_summary.py GRID.jsonl [...]

One line per run: mean latency, wall time, eager (prefill) steps — total seconds, count, tokens
per step, median ms with and without LoRA ops — graph-replayed decode steps (seconds, count,
median ms) and switches. Step rows are ``[start_s, seconds, graphed, rows, tokens, lora_ops]``
(since session 7 followed by the weights' mode, when a mode controller ran).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _median_ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):5.1f}" if values else "    –"


def summarise(row: dict[str, Any]) -> str:
    """One run's line (module docstring)."""
    steps = row.get("steps") or []
    eager = [step for step in steps if not step[2]]
    graphed = [step for step in steps if step[2]]
    modes = row["modes"]
    tokens = sum(step[4] for step in eager) / max(1, len(eager))
    return (f"{row['popularity']:8} {row['rate_per_s']:6.2f}/s {row['policy']:14} "
            f"mean {1e3 * row['metrics']['mean_latency_s']:6.0f} ms  wall {row['wall_s']:5.2f} s  "
            f"eager {sum(s[1] for s in eager):5.2f} s / {len(eager):3} steps of {tokens:5.0f} tok "
            f"(median {_median_ms([s[1] for s in eager if s[5]])} ms LoRA, "
            f"{_median_ms([s[1] for s in eager if not s[5]])} ms none)  "
            f"graphs {sum(s[1] for s in graphed):5.2f} s / {len(graphed):3} "
            f"(median {_median_ms([s[1] for s in graphed])} ms)  "
            f"switches {modes.get('num_switches', 0):2} ({modes.get('switch_seconds', 0.0):.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", type=Path)
    args = parser.parse_args()
    for path in args.grids:
        print(f"== {path}")
        for line in path.read_text().splitlines():
            if line.strip():
                print(summarise(json.loads(line)))


if __name__ == "__main__":
    main()
