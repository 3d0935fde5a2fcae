"""RoPE inverse frequencies for every scaling scheme a Llama checkpoint may declare.

Each scheme maps ``(RopeConfig, head_dim, seq_len)`` to ``(inv_freq [head_dim // 2], attention
factor)``; the attention factor multiplies cos and sin. ``seq_len`` only matters for the schemes
that depend on the current context length (``dynamic``, ``longrope``); it is the length of the
sequence whose tokens are being rotated. Base frequencies: ``theta ** (-2i / head_dim)``.

- ``default``: base frequencies.
- ``linear``: base / factor (position interpolation).
- ``dynamic``: NTK-aware; once ``seq_len > max_position_embeddings`` the base becomes
  ``theta * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2))``.
- ``llama3``: wavelengths longer than ``orig / low_freq_factor`` are divided by ``factor``,
  shorter than ``orig / high_freq_factor`` kept, and the band between blended smoothly.
- ``yarn``: per-dimension blend of interpolated (``/ factor``) and extrapolated frequencies
  over a linear ramp between the dimensions that rotate ``beta_fast`` and ``beta_slow`` times
  in ``orig`` positions; attention factor ``0.1 ln(factor) + 1`` (or the mscale ratio).
- ``longrope``: base / short_factor (``seq_len <= orig``) or / long_factor (longer); attention
  factor ``sqrt(1 + ln(factor) / ln(orig))``.
- ``proportional``: only the first ``partial_rotary_factor`` share of angle pairs rotate (the
  rest get frequency 0), then / factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeConfig:
    """Parsed ``rope_parameters`` (or legacy ``rope_theta`` + ``rope_scaling``)."""

    rope_type: str = "default"
    theta: float = 10000.0
    max_position_embeddings: int = 2048
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    partial_rotary_factor: float = 1.0

    @property
    def original_max(self) -> int:
        return self.original_max_position_embeddings or self.max_position_embeddings

    @property
    def length_threshold(self) -> int | None:
        """Context length above which the frequencies change, or ``None`` if they never do."""
        if self.rope_type == "dynamic":
            return self.max_position_embeddings
        if self.rope_type == "longrope":
            return self.original_max
        return None


InvFreqFn = Callable[[RopeConfig, int, int | None], tuple[torch.Tensor, float]]


def _base_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta ** exponents)


def _require_factor(cfg: RopeConfig) -> float:
    if cfg.factor is None:
        raise ValueError(f"rope_type {cfg.rope_type!r} needs a 'factor'")
    return float(cfg.factor)


def _default(cfg: RopeConfig, head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(cfg.theta, head_dim), 1.0


def _linear(cfg: RopeConfig, head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(cfg.theta, head_dim) / _require_factor(cfg), 1.0


def _dynamic(cfg: RopeConfig, head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    factor = _require_factor(cfg)
    length = max(seq_len or 0, cfg.max_position_embeddings)
    growth = factor * length / cfg.max_position_embeddings - (factor - 1)
    theta = cfg.theta * growth ** (head_dim / (head_dim - 2))
    return _base_inv_freq(theta, head_dim), 1.0


def _llama3(cfg: RopeConfig, head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    factor = _require_factor(cfg)
    inv_freq = _base_inv_freq(cfg.theta, head_dim)
    orig = cfg.original_max
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > orig / cfg.low_freq_factor
    short_wave = wavelen < orig / cfg.high_freq_factor
    scaled = torch.where(long_wave, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    return torch.where(~long_wave & ~short_wave, blended, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: RopeConfig, head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    orig = cfg.original_max
    factor = cfg.factor if cfg.factor is not None else cfg.max_position_embeddings / orig
    attention = cfg.attention_factor
    if attention is None:
        if cfg.mscale and cfg.mscale_all_dim:
            attention = _yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    def dim_for_rotations(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = dim_for_rotations(cfg.beta_fast), dim_for_rotations(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((dims - low) / (high - low)).clamp(0, 1)
    extrapolated = _base_inv_freq(cfg.theta, head_dim)
    interpolated = extrapolated / factor
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency per dimension
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


def _longrope(cfg: RopeConfig, head_dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    orig = cfg.original_max
    if cfg.short_factor is None or cfg.long_factor is None:
        raise ValueError("rope_type 'longrope' needs 'short_factor' and 'long_factor'")
    factor = cfg.factor if cfg.factor is not None else cfg.max_position_embeddings / orig
    attention = cfg.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    use_long = seq_len is not None and seq_len > orig
    ext = torch.tensor(cfg.long_factor if use_long else cfg.short_factor, dtype=torch.float32,
                       device="cpu")
    return _base_inv_freq(cfg.theta, head_dim) / ext, float(attention)


def _proportional(
    cfg: RopeConfig, head_dim: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    num_rotated = int(cfg.partial_rotary_factor * head_dim // 2)
    inv_freq = torch.zeros(head_dim // 2, dtype=torch.float32, device="cpu")
    inv_freq[:num_rotated] = _base_inv_freq(cfg.theta, head_dim)[:num_rotated]
    return inv_freq / (cfg.factor if cfg.factor is not None else 1.0), 1.0


ROPE_SCHEMES: dict[str, InvFreqFn] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "llama3": _llama3,
    "yarn": _yarn,
    "longrope": _longrope,
    "proportional": _proportional,
}


def compute_inv_freq(cfg: RopeConfig, head_dim: int,
                     seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim // 2] float32 on CPU, attention factor)`` for ``cfg.rope_type``.

    Always computed on the CPU (also inside a ``torch.device("meta")`` context), in float32.
    """
    if cfg.rope_type not in ROPE_SCHEMES:
        raise ValueError(f"unknown rope_type {cfg.rope_type!r}; supported: {sorted(ROPE_SCHEMES)}")
    return ROPE_SCHEMES[cfg.rope_type](cfg, head_dim, seq_len)
