"""Benchmark results as files: JSONL rows (one per policy × popularity × rate), a Markdown
summary table and a PNG (mean latency vs rate per policy; mode timeline of the busiest run of
each policy). Rows carry the device, git sha and setup so a result file stands on its own."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MODE_LEVELS = {"unmerged": 0, "mixed": 1, "merged": 2}


def device_name(device: str = "auto") -> str:
    """The GPU's name, or ``CPU, N cores`` (the cores this process may use)."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {len(os.sched_getaffinity(0))} cores"


def git_sha() -> str:
    """``HEAD``'s sha, with ``-dirty`` when the working tree has changes (read-only git calls)."""
    where = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=where).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               check=True, cwd=where).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def write_rows(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{float(value) * scale:.{digits}f}"


def markdown_summary(rows: Sequence[dict[str, Any]], note: str = "") -> str:
    """One table row per result row: latencies and TTFT/TPOT in ms, attainment in %."""
    head = rows[0] if rows else {}
    lines = ["# Serving benchmark (`valora bench serve`)", ""]
    if head:
        lines += [f"Device: **{head['device']}**; git `{head['git_sha']}`; target "
                  f"`{head['target']}`; model `{head['setup']['model']}`; "
                  f"{head['setup']['num_adapters']} adapters (ranks "
                  f"{head['setup']['adapter_ranks']}).", ""]
    if note:
        lines += [note, ""]
    lines += ["| policy | popularity | arrival | rate req/s | n | mean lat ms | P50 | P90 | P99 |"
              " TTFT mean ms | TPOT mean ms | target att. % | thr req/s | switches | failed |"
              " decide ms/step | eager/graph steps |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["metrics"]
        modes = row.get("modes") or {}
        lines.append(
            f"| {row['policy']} | {row['popularity']} | {row['arrival']} | {row['rate_per_s']:g} "
            f"| {int(m['num_requests'])} | {_fmt(m['mean_latency_s'], 1e3)} "
            f"| {_fmt(m['p50_latency_s'], 1e3)} | {_fmt(m['p90_latency_s'], 1e3)} "
            f"| {_fmt(m['p99_latency_s'], 1e3)} | {_fmt(m['mean_ttft_s'], 1e3)} "
            f"| {_fmt(m['mean_tpot_s'], 1e3, 2)} | {_fmt(m['target_attainment'], 100)} "
            f"| {_fmt(m['throughput_rps'], 1.0, 2)} | {modes.get('num_switches', '–')} "
            f"| {int(m['num_failed'])} | {_decide_ms(modes)} | {_step_paths(modes)} |")
    repeats = sorted({int(row.get("repeat", 0)) for row in rows})
    if len(repeats) > 1:
        grids = [[row for row in rows if int(row.get("repeat", 0)) == k] for k in repeats]
        comparison = pooled_comparison(grids)
    else:
        comparison = policy_comparison(rows)
    if comparison:
        lines += ["", comparison]
    return "\n".join(lines) + "\n"


def _latencies(row: dict[str, Any]) -> dict[str, float]:
    """Per request id: end-to-end latency (s) of the requests of ``row`` that finished."""
    found: dict[str, float] = {}
    for request in row.get("requests") or []:
        if request.get("error") is None and request.get("finish_s") is not None:
            found[str(request["request_id"])] = (float(request["finish_s"])
                                                 - float(request["arrival_s"]))
    return found


def paired_change_interval(ours: dict[str, float], theirs: dict[str, float],
                           resamples: int = 2000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float] | None:
    """Bootstrap interval of ``mean(ours) / mean(theirs) − 1`` over the requests both runs
    finished (the policies replay one workload, so requests pair by id); None under 5 pairs."""
    import random

    ids = sorted(set(ours) & set(theirs))
    if len(ids) < 5:
        return None
    generator = random.Random(seed)
    changes = []
    for _ in range(resamples):
        picks = [generator.choice(ids) for _ in ids]
        den = sum(theirs[i] for i in picks)
        if den > 0:
            changes.append(sum(ours[i] for i in picks) / den - 1.0)
    changes.sort()
    tail = (1.0 - level) / 2.0
    return (changes[int(tail * (len(changes) - 1))],
            changes[int((1.0 - tail) * (len(changes) - 1))])


def _decide_ms(modes: dict[str, Any]) -> str:
    steps = modes.get("num_steps") or 0
    if "decision_seconds" not in modes or not steps:
        return "–"
    return f"{1e3 * float(modes['decision_seconds']) / steps:.3f}"


def _step_paths(modes: dict[str, Any]) -> str:
    if "graph_steps" not in modes:
        return "–"
    return f"{int(modes.get('eager_steps', 0))}/{int(modes['graph_steps'])}"


def _versus_best(means: dict[str, float], policy: str) -> tuple[str, float] | None:
    """The best other policy by mean and ``policy``'s relative change against it (None when
    either is missing)."""
    others = {name: value for name, value in means.items() if name != policy}
    if policy not in means or not others:
        return None
    best = min(others, key=lambda name: others[name])
    return best, means[policy] / others[best] - 1.0


def _interval_text(ours: dict[str, float], theirs: dict[str, float]) -> str:
    interval = paired_change_interval(ours, theirs)
    return "–" if interval is None else f"{interval[0]:+.0%} … {interval[1]:+.0%}"


def _by_repeat(per_repeat: Sequence[dict[str, float]]) -> dict[str, float]:
    """Latencies of several repeats in one mapping, request ids prefixed by the repeat (requests
    pair by id within a repeat)."""
    return {f"{k}:{rid}": v for k, found in enumerate(per_repeat) for rid, v in found.items()}


def policy_comparison(rows: Sequence[dict[str, Any]], policy: str = "valora",
                      bar: float = 0.20) -> str:
    """Per (popularity, rate): ``policy``'s mean latency against the best other policy's, and
    whether it is at least ``bar`` lower (issue 5's serving bar), with a paired bootstrap 95 %
    interval of the change over the requests both runs finished (how much of the difference a
    short run can tell from noise). Empty without both."""
    cells: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["metrics"].get("mean_latency_s") is not None:
            cells.setdefault((row["popularity"], row["rate_per_s"]), {})[row["policy"]] = row
    lines = [f"| popularity | rate req/s | {policy} mean ms | best baseline | its mean ms | "
             f"{policy} vs best | 95 % interval (paired bootstrap) | >= {bar:.0%} lower |",
             "|---|---|---|---|---|---|---|---|"]
    for (popularity, rate), by_policy in sorted(cells.items()):
        means = {name: row["metrics"]["mean_latency_s"] for name, row in by_policy.items()}
        versus = _versus_best(means, policy)
        if versus is None:
            continue
        best, change = versus
        spread = _interval_text(_latencies(by_policy[policy]), _latencies(by_policy[best]))
        lines.append(f"| {popularity} | {rate:g} | {means[policy] * 1e3:.1f} | {best} | "
                     f"{means[best] * 1e3:.1f} | {change:+.1%} | {spread} | "
                     f"{'yes' if change <= -bar else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def pooled_comparison(grids: Sequence[Sequence[dict[str, Any]]], policy: str = "valora",
                      bar: float = 0.20) -> str:
    """Repeats of one grid, pooled: per (popularity, share of capacity) cell — rates are
    re-measured fractions of each repeat's calibrated capacity, so cells match by
    ``rate / capacity`` rounded to 0.01 (by the rate itself when no capacity was measured) — each
    policy's mean latency over the requests of every
    repeat, ``policy`` against the best other policy by that pooled mean, a paired bootstrap 95 %
    interval over all pairs (requests pair by id within their repeat), and each repeat's own
    ``policy``-vs-best change, whose spread shows how far one short run can be trusted."""
    cells: dict[tuple[str, float], list[dict[str, dict[str, Any]]]] = {}
    for repeat, rows in enumerate(grids):
        for row in rows:
            if row["metrics"].get("mean_latency_s") is None:
                continue
            capacity = row.get("capacity_per_s")  # absolute rates (no calibration): by rate
            share = (round(float(row["rate_per_s"]) / float(capacity), 2) if capacity
                     else float(row["rate_per_s"]))
            runs = cells.setdefault((row["popularity"], share), [])
            while len(runs) <= repeat:
                runs.append({})
            runs[repeat][row["policy"]] = row
    lines = [f"| popularity | share of capacity | repeats | {policy} mean ms | best baseline | "
             f"its mean ms | {policy} vs best (pooled) | 95 % interval (paired bootstrap) | "
             f"each repeat: {policy} vs its best | >= {bar:.0%} lower |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (popularity, share), runs in sorted(cells.items()):
        runs = [run for run in runs if policy in run and len(run) > 1]
        if not runs:
            continue
        names = set.intersection(*(set(run) for run in runs))
        pooled = {name: [_latencies(run[name]) for run in runs] for name in names}
        means = {name: (sum(sum(found.values()) for found in values)
                        / max(1, sum(len(found) for found in values)))
                 for name, values in pooled.items()}
        versus = _versus_best(means, policy)
        if versus is None:
            continue
        best, change = versus
        spread = _interval_text(_by_repeat(pooled[policy]), _by_repeat(pooled[best]))
        each = []
        for run in runs:
            own = _versus_best({name: row["metrics"]["mean_latency_s"]
                                for name, row in run.items()}, policy)
            if own is not None:
                each.append(f"{own[1]:+.0%}")
        lines.append(f"| {popularity} | {share:g} | {len(runs)} | {means[policy] * 1e3:.1f} | "
                     f"{best} | {means[best] * 1e3:.1f} | {change:+.1%} | {spread} | "
                     f"{', '.join(each)} | {'yes' if change <= -bar else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Left: mean latency vs rate, one line per (policy, popularity). Right: the mode timeline
    (unmerged / mixed / merged) of each policy's highest-rate run with switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["policy"], row["popularity"]), []).append(row)
    skews = sorted({popularity for _, popularity in groups})
    styles = {skew: ("-", "--", ":", "-.")[i % 4] for i, skew in enumerate(skews)}
    for (policy, popularity), items in sorted(groups.items()):
        by_rate: dict[float, list[float]] = {}  # repeats of a grid: their mean per rate
        for r in items:
            by_rate.setdefault(r["rate_per_s"], []).append(
                (r["metrics"]["mean_latency_s"] or float("nan")) * 1e3)
        rates = sorted(by_rate)
        latency = [sum(by_rate[rate]) / len(by_rate[rate]) for rate in rates]
        left.plot(rates, latency, styles[popularity], marker="o",
                  label=f"{policy} / {popularity}")
    left.set_xlabel("offered rate (req/s)")
    left.set_ylabel("mean latency (ms, log scale)")
    left.set_yscale("log")
    left.set_title("latency vs rate")
    left.legend(fontsize=7)
    busiest: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("modes") and row["rate_per_s"] >= busiest.get(
                row["policy"], {"rate_per_s": -1.0})["rate_per_s"]:
            busiest[row["policy"]] = row
    for offset, (policy, row) in enumerate(sorted(busiest.items())):
        timeline = row["modes"]["timeline"]
        if not timeline:
            continue
        times = [entry[0] for entry in timeline] + [row["wall_s"]]
        levels = [MODE_LEVELS.get(entry[1], 0) + 0.08 * offset for entry in timeline]
        right.step(times, [*levels, levels[-1]], where="post",
                   label=f"{policy} ({row['popularity']}, {row['rate_per_s']:g}/s, "
                         f"{row['modes']['num_switches']} switches)")
    right.set_yticks(list(MODE_LEVELS.values()), list(MODE_LEVELS))
    right.set_xlabel("time since start (s)")
    right.set_title("mode timeline (highest rate per policy)")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
