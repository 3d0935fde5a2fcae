"""Markdown summary of one ``bench_decode.py`` run: ceilings, decode grid, prefill, peer, bars."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

BAR_BATCH = 32
LABELS = ("stock", "fused", "serial", "overlap", "fused_kv")


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _bars(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| bar | figure | target | met |", "| --- | --- | --- | --- |"]
    for label in LABELS:
        for scenario, name in (("base", "base decode"), ("mixed32_ranks", "32 mixed adapters")):
            row = _find(rows, section="decode", label=label, scenario=scenario, batch=BAR_BATCH)
            if row:
                ratio = row["over_floor"]
                lines.append(f"| {name} @{BAR_BATCH} ({label}) / own floor | {ratio:.3f}× "
                             f"({row['median_ms']:.2f} vs {row['floor_ms']:.2f} ms) | ≤ 1.3× | "
                             f"{'yes' if ratio <= 1.3 else 'no'} |")
    peer = _find(rows, section="peer", mode="adapter_names_mixed8_r16", batch=BAR_BATCH)
    for label in LABELS:
        ours = _find(rows, section="decode", label=label, scenario="mixed8_r16", batch=BAR_BATCH)
        if peer and ours:
            speedup = peer["median_ms"] / ours["median_ms"]
            lines.append(f"| mixed 8×r16 @{BAR_BATCH} vs HF+PEFT adapter_names ({label}) | "
                         f"{speedup:.1f}× ({peer['median_ms']:.1f} vs {ours['median_ms']:.2f} ms)"
                         f" | ≥ 50× | {'yes' if speedup >= 50 else 'no'} |")
    return lines


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    head = rows[0] if rows else {}
    lines = [f"# Model benchmark ({head.get('model')}, {head.get('dtype')})", "",
             f"Device: {head.get('device')}; git sha {head.get('git_sha')}.", ""]
    ceil = _find(rows, section="ceilings")
    if ceil:
        lines += [f"Ceilings measured in this run: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s "
                  f"(read + write), bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.", ""]
    lines += ["## Bars", "", *_bars(rows), ""]
    lines += ["## valora decode step (graph replay + LM head), context ≈ 600", "",
              "| layers | scenario | batch | median ms | min | max | floor ms | × floor |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.get("section") == "decode":
            floor = row.get("floor_ms")
            floor_text = "" if floor is None else f"{floor:.3f}"
            ratio_text = "" if floor is None else f"{row['over_floor']:.2f}"
            lines.append(
                f"| {row['label']} | {row['scenario']} | {row['batch']} | {row['median_ms']:.3f} |"
                f" {row['min_ms']:.3f} | {row['max_ms']:.3f} | {floor_text} | {ratio_text} |")
    lines += ["", "## Prefill (image prompts, 600 tokens each)", "",
              "| who | prompts | median ms | tokens/s | floor ms (flops) |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.get("section") == "prefill":
            lines.append(f"| valora ({row.get('label', '')}) | {row['prompts']} | {row['median_ms']:.1f} | "
                         f"{row['tokens_per_s']:.0f} | {row['floor_ms']:.1f} |")
        if row.get("section") == "peer" and row.get("mode") == "prefill_images":
            lines.append(f"| HF | {row['batch']} | {row['median_ms']:.1f} | "
                         f"{row['tokens'] / (row['median_ms'] * 1e-3):.0f} | |")
    lines += ["", "## HF transformers + PEFT decode step", "",
              "| mode | batch | median ms | min | max |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.get("section") == "peer" and row.get("mode") != "prefill_images":
            lines.append(f"| {row['mode']} | {row['batch']} | {row['median_ms']:.2f} | "
                         f"{row['min_ms']:.2f} | {row['max_ms']:.2f} |")
    errors = [row for row in rows if row.get("section") == "error"]
    if errors:
        lines += ["", "## Sections that failed", ""]
        lines += [f"- {row['label']}: {row['error']}" for row in errors]
    path.write_text("\n".join(lines) + "\n")


def kernel_table(rows: list[dict[str, Any]], labels: Iterable[str]) -> str:
    """Kernel counts and the base decode figure at batch 32 per ``labels`` mode (``bench_decode``
    prints it before the bars)."""
    lines = ["| layers | kernels/step (eager) | per layer | base @32 ms | × floor |",
             "| --- | --- | --- | --- | --- |"]
    for label in labels:
        count = next((r for r in rows if r.get("section") == "kernels"
                      and r.get("label") == label), None)
        step = next((r for r in rows if r.get("section") == "decode" and r.get("label") == label
                     and r.get("scenario") == "base" and r.get("batch") == 32), None)
        if count is None and step is None:
            continue
        cells = [label,
                 str(count["kernels_per_step"]) if count else "",
                 f"{count['per_layer']:.1f}" if count else "",
                 f"{step['median_ms']:.3f}" if step else "",
                 f"{step['over_floor']:.2f}" if step else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
