"""Argument checks and number formats shared by the scheduler's pure policies (adapt, rollout)."""

from __future__ import annotations

import math

from meshai.errors import ConfigError


def number(name: str, value: object, lo: float, hi: float = math.inf, *, strict_lo: bool = False) -> float:
    """A finite number within [lo, hi] (or (lo, hi] with ``strict_lo``), else ConfigError naming it."""
    v = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(v) and (v > lo if strict_lo else v >= lo) and v <= hi):
        rel = ">" if strict_lo else ">="
        upper = f" and <= {hi:g}" if math.isfinite(hi) else ""
        raise ConfigError(f"{name} must be a finite number {rel} {lo:g}{upper}, got {value!r}")
    return v


def integer(name: str, value: object, lo: int) -> int:
    """An int (not a bool) >= ``lo``, else ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def short(x: float) -> str:
    """A figure as a person reads it: one decimal from 10 up, else 3 significant digits (``63.0``,
    ``4.08``, ``0.015``)."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"
