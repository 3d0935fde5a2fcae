"""Benchmark workloads: who asks what, for which adapter, when.

Arrival times and adapter picks come from the orchestrator's workload generator
(:func:`valora.orchestrator.workload.generate_workload`); this module adds the request *kind*
(``short``: one image + a question with a short answer, ``long``: the same with a long answer,
``frames``: several images of one scene, short answer) and replays/saves traces as JSONL
(one object per line: ``arrival_s``, ``adapter``, ``prompt_tokens``, ``output_tokens``, and
optionally ``kind``, ``num_images``, ``latency_target_s``).

Invariant: for the same :class:`BenchWorkload` and seed the request list is identical.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from valora.errors import InvalidRequestError
from valora.orchestrator.workload import WorkloadSpec, generate_workload

Kind = Literal["short", "long", "frames"]
KINDS: tuple[Kind, ...] = ("short", "long", "frames")

#: Output-token ranges (inclusive) of each kind; ``frames`` answers are short (analytics labels).
OUTPUT_TOKENS: dict[Kind, tuple[int, int]] = {"short": (4, 12), "long": (24, 48), "frames": (4, 8)}


@dataclass(frozen=True)
class BenchRequest:
    """One request of the benchmark: arrival offset (s from start), adapter (``None`` = base),
    prompt words to send besides the images, output tokens to force, number of images."""

    request_id: str
    arrival_s: float
    adapter: str | None
    kind: Kind
    prompt_tokens: int
    output_tokens: int
    num_images: int
    latency_target_s: float | None = None


@dataclass(frozen=True)
class BenchWorkload:
    """Knobs of a synthetic workload. ``kind_mix`` weights ``short``/``long``/``frames``;
    ``num_frames`` images per ``frames`` request; ``prompt_tokens`` range of question words."""

    num_requests: int
    rate_per_s: float
    adapters: tuple[str, ...]
    arrival: Literal["poisson", "gamma"] = "poisson"
    cv: float = 3.0
    popularity: Literal["uniform", "zipf", "one-hot"] = "zipf"
    zipf_alpha: float = 1.0
    hot_fraction: float = 0.7
    kind_mix: tuple[float, float, float] = (0.6, 0.3, 0.1)
    num_frames: int = 4
    prompt_tokens: tuple[int, int] = (8, 24)
    latency_target_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.kind_mix) != 3 or min(self.kind_mix) < 0 or sum(self.kind_mix) <= 0:
            raise InvalidRequestError("kind_mix needs 3 non-negative weights (short, long, frames)")
        if self.num_frames < 1:
            raise InvalidRequestError("num_frames must be at least 1")


def generate(workload: BenchWorkload) -> list[BenchRequest]:
    """Requests in arrival order with ids ``r0, r1, ...`` (deterministic for ``workload.seed``)."""
    spec = WorkloadSpec(
        num_requests=workload.num_requests, rate_per_s=workload.rate_per_s,
        adapters=workload.adapters, popularity=workload.popularity,
        zipf_alpha=workload.zipf_alpha, hot_fraction=workload.hot_fraction,
        arrival=workload.arrival, cv=workload.cv, prompt_tokens=workload.prompt_tokens,
        output_tokens=(1, 1), latency_target_s=workload.latency_target_s, seed=workload.seed,
    )
    base = generate_workload(spec)
    # A second stream (seed-derived) so kinds do not perturb the arrival/adapter draws.
    rng = np.random.default_rng([workload.seed, 1])
    mix = np.asarray(workload.kind_mix, dtype=np.float64)
    kinds = rng.choice(len(KINDS), size=len(base), p=mix / mix.sum())
    requests = []
    for item, kind_index in zip(base, kinds, strict=True):
        kind = KINDS[int(kind_index)]
        low, high = OUTPUT_TOKENS[kind]
        requests.append(BenchRequest(
            request_id=item.request_id, arrival_s=item.arrival_time, adapter=item.adapter,
            kind=kind, prompt_tokens=item.prompt_tokens,
            output_tokens=int(rng.integers(low, high + 1)),
            num_images=workload.num_frames if kind == "frames" else 1,
            latency_target_s=item.latency_target_s,
        ))
    return requests


def load_trace(path: str | Path, adapters: Sequence[str] = ()) -> list[BenchRequest]:
    """Read a JSONL trace (see module docstring); arrivals are shifted to start at 0 and sorted.
    With ``adapters`` given, every adapter named in the trace must be among them."""
    known = set(adapters)
    rows: list[BenchRequest] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            kind = data.get("kind", "short")
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}")
            adapter = data.get("adapter")
            if known and adapter is not None and adapter not in known:
                raise ValueError(f"adapter {adapter!r} is not served")
            target = data.get("latency_target_s")
            rows.append(BenchRequest(
                request_id=str(data.get("request_id", f"r{len(rows)}")),
                arrival_s=float(data["arrival_s"]), adapter=adapter, kind=kind,
                prompt_tokens=int(data.get("prompt_tokens", 16)),
                output_tokens=int(data["output_tokens"]),
                num_images=int(data.get("num_images", 1)),
                latency_target_s=None if target is None else float(target),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{path}:{number}: bad trace row: {exc}") from exc
    if not rows:
        raise InvalidRequestError(f"trace {path} has no requests")
    rows.sort(key=lambda r: r.arrival_s)
    start = rows[0].arrival_s
    return [BenchRequest(**{**asdict(r), "arrival_s": r.arrival_s - start}) for r in rows]


def save_trace(requests: Sequence[BenchRequest], path: str | Path) -> Path:
    """Write ``requests`` as a JSONL trace that :func:`load_trace` reads back unchanged."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in requests))
    return out
