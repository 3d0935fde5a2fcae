"""Summarise ``bench_lora_ops.py`` JSONL: the issue's bars, a Markdown table and a plot.

    python bench/ops/summarize_lora_ops.py bench/results/ops/lora_ops.jsonl \
        --markdown bench/results/ops/summary.md --plot bench/results/ops/lora_ops.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

METHODS = ("valora", "vllm", "peft_loop", "gathered_bmm", "base_gemm")


def median(row: dict, name: str) -> float | None:
    method = row["methods"].get(name, {})
    return method.get("median_us") if method.get("status") == "ok" else None


def ratio(row: dict) -> float | None:
    ours, peer = median(row, "valora"), median(row, "vllm")
    return peer / ours if ours and peer else None


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def label(row: dict) -> str:
    p = row["setup"]
    return f"T={p['tokens']} {p['layer']} {p['ranks']} {p['adapters']}×{p['popularity']}"


def floor_us(row: dict, copy_bw: float = 0.0) -> float:
    """The row's floor; with ``copy_bw`` (bytes/s) > 0 the bytes part is recomputed at it."""
    if copy_bw <= 0:
        return float(row["floor_us"])
    return max(row["bytes"] / copy_bw * 1e6, float(row["floor_flops_us"]))


def bars(rows: list[dict], copy_bw: float = 0.0) -> list[str]:
    lines = ["| bar | target | measured | met |", "| --- | --- | --- | --- |"]
    wrong = [r for r in rows if r["methods"].get("vllm", {}).get("status") == "wrong"]
    for kind, target in (("mixed", 2.0), ("uniform16", 1.3), ("uniform64", 1.3)):
        values = [r for r in (ratio(x) for x in rows if x["setup"]["ranks"] == kind) if r]
        g = geomean(values)
        lines.append(f"| geomean speed-up vs vLLM, {kind} ({len(values)} points) | ≥ {target}× "
                     f"| {g:.2f}× | {'yes' if g >= target else 'no'} |")
    with_ratio = [(ratio(r), r) for r in rows if ratio(r)]
    worst = min(with_ratio, key=lambda item: item[0]) if with_ratio else None
    if worst:
        below = sum(1 for v, _ in with_ratio if v < 0.95)
        lines.append(f"| no point below 0.95× vLLM | 0 points | {below} below; worst "
                     f"{worst[0]:.2f}× ({label(worst[1])}) | {'yes' if below == 0 else 'no'} |")
    lines.append(f"| (vLLM column) | | {len(wrong)} points without a vLLM figure: its result "
                 "failed the check (see NOTES: stale pointer cache in the peer invocation) | |")
    for bw, name in ((0.0, "copy rate measured in this run"),
                     (copy_bw, f"copy rate {copy_bw / 1e12:.2f} TB/s")):
        if name.startswith("copy rate 0"):
            continue
        big = [r for r in rows if floor_us(r, bw) >= 10 and median(r, "valora")]
        near = [r for r in big if median(r, "valora") <= 2 * floor_us(r, bw)]  # type: ignore[operator]
        worst = max(big, key=lambda r: median(r, "valora") / floor_us(r, bw))  # type: ignore[operator]
        lines.append(f"| within 2× of floor where floor ≥ 10 µs ({name}) | all | "
                     f"{len(near)}/{len(big)}; worst {median(worst, 'valora') / floor_us(worst, bw):.2f}×"
                     f" ({label(worst)}) | {'yes' if big and len(near) == len(big) else 'no'} |")
    decode = [r for r in rows if r["setup"]["tokens"] <= 256 and r["setup"]["adapters"] == 32
              and r["setup"]["popularity"] == "distinct" and r["setup"]["ranks"] == "uniform16"
              and r["setup"]["layer"] in ("q", "gate_up")]
    cheap = [r for r in decode if (median(r, "valora") or 1e9) <= (median(r, "base_gemm") or 0)]
    detail = ", ".join(f"{label(r)}: {median(r, 'valora'):.1f} vs base {median(r, 'base_gemm'):.1f}"
                       f" (vLLM {median(r, 'vllm') or float('nan'):.1f}) µs" for r in decode)
    met = "yes" if decode and len(cheap) == len(decode) else "no"
    lines.append("| decode (T ≤ 256, 32 distinct rank-16) LoRA ≤ base GEMM, q and gate_up | all "
                 f"| {len(cheap)}/{len(decode)}: {detail} | {met} |")
    errors = [m.get("rel_err", 0.0) for r in rows for n, m in r["methods"].items() if n == "valora"]
    lines.append(f"| valora rel. error vs fp32 ≤ 1e-2 (bf16) | every point | max "
                 f"{max(errors, default=float('nan')):.1e} | "
                 f"{'yes' if errors and max(errors) <= 1e-2 else 'no'} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    head = "| T | layer | ranks | adapters × popularity | " + " | ".join(METHODS) + \
        " | floor | vLLM/valora | valora/floor |"
    lines = [head, "|" + " --- |" * (len(METHODS) + 7)]
    for r in rows:
        p = r["setup"]
        cells = []
        for name in METHODS:
            value = median(r, name)
            status = r["methods"].get(name, {}).get("status", "-")
            cells.append(f"{value:.1f}" if value else status.split(":")[0])
        q = ratio(r)
        ours = median(r, "valora")
        speed = f"{q:.2f}" if q else "-"
        gap = f"{ours / r['floor_us']:.2f}" if ours else "-"
        lines.append(f"| {p['tokens']} | {p['layer']} | {p['ranks']} | {p['adapters']} × "
                     f"{p['popularity']} | " + " | ".join(cells) + f" | {r['floor_us']:.1f} | "
                     f"{speed} | {gap} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["setup"]["layer"] for r in rows})
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 7), squeeze=False)
    for col, layer in enumerate(layers):
        for kind in ("uniform16", "uniform64", "mixed"):
            speed: dict[int, list[float]] = defaultdict(list)
            gap: dict[int, list[float]] = defaultdict(list)
            for r in rows:
                if r["setup"]["layer"] != layer or r["setup"]["ranks"] != kind:
                    continue
                if ratio(r):
                    speed[r["setup"]["tokens"]].append(ratio(r))  # type: ignore[arg-type]
                if median(r, "valora"):
                    gap[r["setup"]["tokens"]].append(median(r, "valora") / r["floor_us"])  # type: ignore[operator]
            xs = sorted(speed)
            axes[0][col].plot(xs, [geomean(speed[x]) for x in xs], marker="o", label=kind)
            xs = sorted(gap)
            axes[1][col].plot(xs, [geomean(gap[x]) for x in xs], marker="o", label=kind)
        for row, name in ((0, "speed-up vs vLLM (geomean)"), (1, "valora time / floor")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.axhline(1.0 if row == 0 else 2.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(f"{layer}: {name}", fontsize=9)
            ax.set_xlabel("tokens")
            ax.legend(fontsize=7)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"Batched LoRA operator, bf16, CUDA-graph replays ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument("--copy-tbps", type=float, default=0.0,
                        help="also judge the floor bar at this copy rate (TB/s, read + write)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    c = rows[0]["ceilings"]
    text = [f"# LoRA operator benchmark — {rows[0]['device']}", "",
            f"git {rows[0]['git_sha']}; {len(rows)} grid points; bf16; times are medians of "
            "CUDA-graph replays in µs per call; copy bandwidth "
            f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f}"
            " TFLOP/s (measured in the same run).", "", f"![plot]({args.plot.name})", "",
            "## Bars", "", *bars(rows, args.copy_tbps * 1e12), "", "## Grid", "", *table(rows), ""]
    args.markdown.write_text("\n".join(text))
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
