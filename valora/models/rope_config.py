"""Read RoPE settings from a text config, in either the transformers 5 or the legacy layout.

- transformers 5: ``rope_parameters = {"rope_type": ..., "rope_theta": ..., "factor": ...}``
- legacy (transformers 4): top-level ``rope_theta`` plus an optional ``rope_scaling`` dict whose
  kind is named by ``rope_type`` or ``type``.

Pretraining length for ``llama3``/``yarn``/``longrope``: the dict's
``original_max_position_embeddings``, else a top-level key of that name, else
``max_position_embeddings`` (what transformers' standardisation does).
"""

from __future__ import annotations

from typing import Any

from valora.errors import ModelLoadError
from valora.layers.rope_scaling import ROPE_SCHEMES, RopeConfig


def _opt_float(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    return None if value is None else float(value)


def _opt_floats(params: dict[str, Any], key: str) -> tuple[float, ...] | None:
    value = params.get(key)
    return None if value is None else tuple(float(v) for v in value)


def parse_rope_config(raw: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    """The ``RopeConfig`` of text config ``raw`` (``ModelLoadError`` for unknown kinds)."""
    params: dict[str, Any] = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in ROPE_SCHEMES:
        raise ModelLoadError(
            f"unsupported rope_type {rope_type!r}; supported: {sorted(ROPE_SCHEMES)}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if partial != 1.0 and rope_type != "proportional":
        raise ModelLoadError(
            f"partial_rotary_factor={partial} is not supported by Llama-family models")
    original = params.get("original_max_position_embeddings",
                          raw.get("original_max_position_embeddings"))
    beta_fast, beta_slow = params.get("beta_fast"), params.get("beta_slow")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        max_position_embeddings=max_position_embeddings,
        factor=_opt_float(params, "factor"),
        original_max_position_embeddings=None if original is None else int(original),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        attention_factor=_opt_float(params, "attention_factor"),
        beta_fast=float(beta_fast) if beta_fast else 32.0,
        beta_slow=float(beta_slow) if beta_slow else 1.0,
        mscale=_opt_float(params, "mscale"),
        mscale_all_dim=_opt_float(params, "mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        short_factor=_opt_floats(params, "short_factor"),
        long_factor=_opt_floats(params, "long_factor"),
        partial_rotary_factor=partial,
    )
