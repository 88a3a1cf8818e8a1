"""Deterministic traffic splits: which side of an A/B test or a rollout a robot or a request lands on."""

from __future__ import annotations

import hashlib
import math

from meshai.errors import ConfigError

__all__ = ["split"]


def split(key: str, share: float, salt: str = "") -> bool:
    """Whether ``key`` (a robot id for ``--by robot``, a request id for ``--by request``) goes to
    variant B, given B's ``share`` of traffic in [0, 1].  Deterministic: sha256 of salt and key mapped
    to a uniform number in [0, 1); a different ``salt`` (e.g. the test's id) reshuffles the split.  The
    sides grow monotonically with ``share``: a key on B at 10 % is on B at 50 % too."""
    if not isinstance(key, str):
        raise ConfigError(f"split key must be a string, got {key!r}")
    s = float(share) if isinstance(share, int | float) and not isinstance(share, bool) else math.nan
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ConfigError(f"split share must be a number in [0, 1], got {share!r}")
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return u < s
