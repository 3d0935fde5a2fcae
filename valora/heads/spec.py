"""``task_head.json``: the description of a task head, validated on construction.

Example (classification on the last prompt token)::

    {"format_version": 1, "kind": "classification", "task": "digits",
     "labels": ["zero", "one", ...], "hidden_size": 256, "num_input_tokens": 1,
     "pooling": "last", "params": {"mlp_hidden": 256}}

``num_input_tokens`` is how many trailing *prompt* hidden states the head reads: the final-normed
hidden states of the decoder (the input of the LM head) at prompt positions
``[num_prompt_tokens - num_input_tokens, num_prompt_tokens)``. ``pooling`` says how a
classification head reduces them (``last``: the last one; ``mean``: their mean); a detection head
attends to all of them. ``params`` holds the kind's dimensions (see each head class).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from valora.errors import InvalidAdapterError

FORMAT_VERSION = 1
POOLINGS = ("last", "mean")
ParamValue = int | float | str


@dataclass(frozen=True)
class HeadSpec:
    """A head's kind, label set, input window and dimensions.

    Invariants (checked here, kind-specific ``params`` checked by the head class): at least two
    distinct non-empty labels for classification and one for detection; ``hidden_size`` and
    ``num_input_tokens`` positive; ``pooling`` one of ``last``/``mean``.
    """

    kind: str
    task: str
    labels: tuple[str, ...]
    hidden_size: int
    num_input_tokens: int = 1
    pooling: str = "last"
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "params", dict(self.params))
        where = f"task head {self.task!r}"
        if self.format_version != FORMAT_VERSION:
            raise InvalidAdapterError(
                f"{where}: format_version {self.format_version} is not supported "
                f"(this valora reads version {FORMAT_VERSION})")
        if not self.task or not isinstance(self.task, str):
            raise InvalidAdapterError("task head: 'task' must be a non-empty string")
        if any(not isinstance(label, str) or not label for label in self.labels):
            raise InvalidAdapterError(f"{where}: every label must be a non-empty string")
        if len(set(self.labels)) != len(self.labels):
            raise InvalidAdapterError(f"{where}: labels must be distinct, got {list(self.labels)}")
        for name in ("hidden_size", "num_input_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidAdapterError(
                    f"{where}: {name} must be a positive integer, got {value!r}")
        if self.pooling not in POOLINGS:
            raise InvalidAdapterError(
                f"{where}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for key, value in self.params.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidAdapterError(f"{where}: params.{key} is not finite")

    def param_int(self, name: str, default: int) -> int:
        """A positive integer parameter (``InvalidAdapterError`` otherwise)."""
        value = self.params.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidAdapterError(
                f"task head {self.task!r}: params.{name} must be a positive integer, got {value!r}")
        return value

    def param_float(self, name: str, default: float, low: float, high: float) -> float:
        """A float parameter within ``[low, high]`` (``InvalidAdapterError`` otherwise)."""
        value = self.params.get(name, default)
        in_range = False
        if isinstance(value, int | float) and not isinstance(value, bool):
            in_range = low <= value <= high
        if not in_range:
            raise InvalidAdapterError(
                f"task head {self.task!r}: params.{name} must be a number in [{low}, {high}], "
                f"got {value!r}")
        return float(value)

    def to_json(self) -> str:
        return json.dumps({
            "format_version": self.format_version, "kind": self.kind, "task": self.task,
            "labels": list(self.labels), "hidden_size": self.hidden_size,
            "num_input_tokens": self.num_input_tokens, "pooling": self.pooling,
            "params": dict(self.params),
        }, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "task_head.json") -> HeadSpec:
        """Parse and validate; every problem is an ``InvalidAdapterError`` naming ``where``."""
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidAdapterError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise InvalidAdapterError(f"{where}: expected a JSON object")
        missing = [k for k in ("kind", "task", "labels", "hidden_size") if k not in raw]
        if missing:
            raise InvalidAdapterError(f"{where}: missing field(s) {missing}")
        unknown = set(raw) - {"format_version", "kind", "task", "labels", "hidden_size",
                              "num_input_tokens", "pooling", "params"}
        if unknown:
            raise InvalidAdapterError(f"{where}: unknown field(s) {sorted(unknown)}")
        if not isinstance(raw["labels"], list) or not isinstance(raw.get("params", {}), dict):
            raise InvalidAdapterError(f"{where}: 'labels' must be a list and 'params' an object")
        try:
            return cls(kind=str(raw["kind"]), task=raw["task"], labels=tuple(raw["labels"]),
                       hidden_size=raw["hidden_size"],
                       num_input_tokens=raw.get("num_input_tokens", 1),
                       pooling=raw.get("pooling", "last"), params=raw.get("params", {}),
                       format_version=raw.get("format_version", FORMAT_VERSION))
        except InvalidAdapterError as exc:
            raise InvalidAdapterError(f"{where}: {exc}") from exc
