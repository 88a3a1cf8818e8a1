"""A/B tests between two model versions: deterministic traffic split and significance tests, as data.

The runtime records per-variant measurements; these functions decide whether the difference between
variant A (the current version) and variant B (the candidate) is real.  Nothing here performs I/O or
reads a clock, and every answer is a ``TestResult`` with a human-readable reason.

* ``compare_latency(a_ms, b_ms)``: latencies are skewed and heavy-tailed, so the test is the
  Mann–Whitney U test (rank-based, two-sided) with the normal approximation, tie correction and
  continuity correction (the same as ``scipy.stats.mannwhitneyu(..., method="asymptotic")``).  The
  effect is the ratio of medians (B / A) and the difference of p95s (B − A).
* ``compare_rates(a_success, a_n, b_success, b_n)``: error rates or accuracies, with the pooled
  two-proportion z-test; the effect is the difference of rates (B − A) with a 95 % Wald (unpooled)
  confidence interval.
* ``split(key, share)``: whether a robot or a request (by its key) goes to B, by hashing: the same key
  always lands on the same side, and over many keys the share of B is ``share``.

A result is ``significant`` only when p < alpha *and* both samples hold at least ``min_samples``
values; with fewer, the reason says "too few samples" whatever the p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshai.errors import ConfigError
from meshai.split import split

__all__ = ["MIN_SAMPLES", "TestResult", "compare_latency", "compare_rates", "split"]

#: Fewest values per variant for a result to count as significant.
MIN_SAMPLES = 20
#: Two-sided 97.5 % quantile of the standard normal (for the 95 % confidence interval).
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class TestResult:
    """The outcome of one A/B significance test.

    ``statistic`` is the test's statistic (Mann–Whitney U of sample A, or the z of the two-proportion
    test), ``z`` its standardised value, ``p_value`` two-sided.  ``effect`` holds the effect sizes by
    name: for latency ``median_a``, ``median_b``, ``median_ratio`` (B / A), ``p95_a``, ``p95_b``,
    ``p95_diff`` (B − A, ms); for rates ``rate_a``, ``rate_b``, ``diff`` (B − A), ``ci_low``,
    ``ci_high`` (95 % Wald interval of the difference).
    """

    __test__ = False  # not a pytest class, despite the name

    test: str
    metric: str
    n_a: int
    n_b: int
    statistic: float
    z: float
    p_value: float
    alpha: float
    min_samples: int
    significant: bool
    reason: str
    effect: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "metric": self.metric,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "statistic": self.statistic,
            "z": self.z,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "min_samples": self.min_samples,
            "significant": self.significant,
            "reason": self.reason,
            "effect": dict(self.effect),
        }


# ------------------------------------------------------------------------------------------ checks


def _alpha(alpha: object) -> float:
    a = float(alpha) if isinstance(alpha, int | float) and not isinstance(alpha, bool) else math.nan
    if not (math.isfinite(a) and 0.0 < a < 1.0):
        raise ConfigError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return a


def _count(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _sample(name: str, values: Sequence[float]) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of numbers") from None
    if x.ndim != 1:
        raise ConfigError(f"{name} must be a flat sequence of numbers, got shape {x.shape}")
    if x.size == 0:
        raise ConfigError(f"{name} is empty: a test needs at least one value per variant")
    bad = ~np.isfinite(x) | (x < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ConfigError(f"{name}[{i}] must be a finite latency >= 0 ms, got {x[i]!r}")
    return x


def _normal_sf2(z: float) -> float:
    """Two-sided tail probability P(|Z| >= |z|) of the standard normal."""
    return min(1.0, math.erfc(abs(z) / math.sqrt(2.0)))


def _fmt_p(p: float) -> str:
    return "p < 1e-12" if p < 1e-12 else f"p = {p:.3g}"


def _verdict(p: float, alpha: float, n_a: int, n_b: int, min_samples: int) -> tuple[bool, str]:
    if min(n_a, n_b) < min_samples:
        return False, f"too few samples: n = {n_a} / {n_b}, need at least {min_samples} per variant"
    if p < alpha:
        return True, f"significant at α = {alpha:g}"
    return False, f"not significant at α = {alpha:g}"


# ------------------------------------------------------------------------------------------- tests


def _ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based; ties share the mean of their ranks) and the sizes of the tie groups."""
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    del uniq
    start = np.cumsum(counts) - counts  # ranks before each group
    avg = start + (counts + 1) / 2.0
    return avg[inverse], counts


def compare_latency(
    a_ms: Sequence[float], b_ms: Sequence[float], alpha: float = 0.05, *, min_samples: int = MIN_SAMPLES
) -> TestResult:
    """Mann–Whitney U test (two-sided, normal approximation with tie and continuity correction) of
    latencies of variant A against variant B, with the ratio of medians and difference of p95s."""
    a, b = _sample("a_ms", a_ms), _sample("b_ms", b_ms)
    alpha = _alpha(alpha)
    min_samples = _count("min_samples", min_samples, 1)
    n_a, n_b = a.size, b.size
    n = n_a + n_b
    ranks, ties = _ranks(np.concatenate([a, b]))
    u_a = float(ranks[:n_a].sum() - n_a * (n_a + 1) / 2.0)
    mu = n_a * n_b / 2.0
    tie_term = float(np.sum(ties.astype(np.float64) ** 3 - ties)) / (n * (n - 1)) if n > 1 else 0.0
    var = n_a * n_b / 12.0 * ((n + 1) - tie_term)
    if var <= 0.0:  # every value equal: no evidence of any difference
        z, p = 0.0, 1.0
    else:
        d = abs(u_a - mu)
        z = math.copysign(max(d - 0.5, 0.0) / math.sqrt(var), u_a - mu)
        p = _normal_sf2(z)
    med_a, med_b = float(np.median(a)), float(np.median(b))
    p95_a, p95_b = float(np.percentile(a, 95)), float(np.percentile(b, 95))
    ratio = med_b / med_a if med_a > 0 else (1.0 if med_b == 0 else math.inf)
    significant, verdict = _verdict(p, alpha, n_a, n_b, min_samples)
    if med_b > med_a:
        head = "B is slower"
    elif med_b < med_a:
        head = "B is faster"
    else:
        head = "B has the same median"
    reason = (
        f"{head}: median {med_b:.3g} ms vs {med_a:.3g} ms (×{ratio:.3g}), p95 {p95_b:.3g} ms vs "
        f"{p95_a:.3g} ms, Mann–Whitney {_fmt_p(p)} (n = {n_a} / {n_b}): {verdict}"
    )
    return TestResult(
        test="mann-whitney-u",
        metric="latency_ms",
        n_a=n_a,
        n_b=n_b,
        statistic=u_a,
        z=z,
        p_value=p,
        alpha=alpha,
        min_samples=min_samples,
        significant=significant,
        reason=reason,
        effect={
            "median_a": med_a,
            "median_b": med_b,
            "median_ratio": ratio,
            "p95_a": p95_a,
            "p95_b": p95_b,
            "p95_diff": p95_b - p95_a,
        },
    )


def compare_rates(
    a_success: int,
    a_n: int,
    b_success: int,
    b_n: int,
    alpha: float = 0.05,
    *,
    metric: str = "rate",
    min_samples: int = MIN_SAMPLES,
) -> TestResult:
    """Pooled two-proportion z-test (two-sided) of ``a_success / a_n`` against ``b_success / b_n`` —
    error rates (successes = errors) or accuracies (successes = correct answers) — with the difference
    B − A and its 95 % Wald (unpooled) confidence interval.  ``metric`` names the rate in the reason."""
    a_n, b_n = _count("a_n", a_n, 1), _count("b_n", b_n, 1)
    a_s, b_s = _count("a_success", a_success, 0), _count("b_success", b_success, 0)
    if a_s > a_n:
        raise ConfigError(f"a_success must be <= a_n ({a_n}), got {a_s}")
    if b_s > b_n:
        raise ConfigError(f"b_success must be <= b_n ({b_n}), got {b_s}")
    alpha = _alpha(alpha)
    min_samples = _count("min_samples", min_samples, 1)
    pa, pb = a_s / a_n, b_s / b_n
    pooled = (a_s + b_s) / (a_n + b_n)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / a_n + 1.0 / b_n))
    diff = pb - pa
    if se == 0.0:  # both variants all-success or all-failure
        z, p = 0.0, 1.0
    else:
        z = diff / se
        p = _normal_sf2(z)
    half = Z_95 * math.sqrt(pa * (1.0 - pa) / a_n + pb * (1.0 - pb) / b_n)
    lo, hi = diff - half, diff + half
    significant, verdict = _verdict(p, alpha, a_n, b_n, min_samples)
    word = "higher" if diff > 0 else "lower" if diff < 0 else "the same"
    reason = (
        f"B's {metric} is {word}: {pb * 100:.3g} % vs {pa * 100:.3g} % ({diff * 100:+.3g} pp, 95 % CI "
        f"[{lo * 100:+.3g}, {hi * 100:+.3g}] pp), two-proportion z {_fmt_p(p)} (n = {a_n} / {b_n}): {verdict}"
    )
    return TestResult(
        test="two-proportion-z",
        metric=metric,
        n_a=a_n,
        n_b=b_n,
        statistic=z,
        z=z,
        p_value=p,
        alpha=alpha,
        min_samples=min_samples,
        significant=significant,
        reason=reason,
        effect={"rate_a": pa, "rate_b": pb, "diff": diff, "ci_low": lo, "ci_high": hi},
    )
