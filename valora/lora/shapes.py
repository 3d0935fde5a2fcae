"""Shapes of the base language model that an adapter must agree with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from valora.errors import ModelLoadError


@dataclass(frozen=True)
class BaseModelShapes:
    """The language model's projection sizes (the vision tower is never adapted).

    ``head_dim`` may differ from ``hidden // num_heads`` (it is read from the config when given).
    """

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads",
                     "head_dim"):
            value = getattr(self, name)
            if int(value) <= 0:
                raise ModelLoadError(f"BaseModelShapes.{name} must be positive, got {value}")

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of a PEFT language-module name such as ``"k_proj"``."""
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q_width), "k_proj": (self.hidden, kv_width),
            "v_proj": (self.hidden, kv_width), "o_proj": (q_width, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if module not in shapes:
            raise KeyError(f"unknown language module {module!r}; known: {sorted(shapes)}")
        return shapes[module]

    @classmethod
    def from_config_json(cls, directory: str | Path) -> BaseModelShapes:
        """Read ``config.json`` of a Llama checkpoint or of a LLaVA one (its ``text_config``)."""
        path = Path(directory) / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelLoadError(f"no config.json in {directory}") from exc
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_text_config(config.get("text_config") or config)

    @classmethod
    def from_text_config(cls, text: dict[str, object]) -> BaseModelShapes:
        """Build from a (text) config dict with Hugging Face Llama field names."""
        try:
            hidden = _as_int(text["hidden_size"])
            heads = _as_int(text["num_attention_heads"])
            kv_heads = _as_int(text.get("num_key_value_heads") or heads)
            head_dim = _as_int(text.get("head_dim") or hidden // heads)
            return cls(num_layers=_as_int(text["num_hidden_layers"]), hidden=hidden,
                       intermediate=_as_int(text["intermediate_size"]), num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim)
        except KeyError as exc:
            raise ModelLoadError(f"model config lacks {exc.args[0]!r}") from exc


def _as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ModelLoadError(f"expected an integer in the model config, got {value!r}")
    return int(value)
