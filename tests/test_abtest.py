"""A/B significance tests and the traffic split (scheduler/abtest.py): hand-computed cases, limits,
reasons, and a cross-check against scipy.stats where scipy is importable."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from meshai.errors import ConfigError
from scheduler.abtest import TestResult, compare_latency, compare_rates, split


def _p2(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


# ---------------------------------------------------------------------------------------- latency


def test_mann_whitney_hand_computed_no_ties():
    r = compare_latency([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], min_samples=1)
    # ranks of A: 1+2+3 = 6, U_A = 6 - 3*4/2 = 0; mu = 4.5; var = 3*3/12 * 7 = 5.25
    assert r.statistic == 0.0
    assert r.z == pytest.approx(-(4.5 - 0.5) / math.sqrt(5.25))
    assert r.p_value == pytest.approx(_p2(4.0 / math.sqrt(5.25)))
    assert r.p_value == pytest.approx(0.0809, abs=1e-4)
    assert not r.significant and "not significant" in r.reason
    assert r.effect["median_ratio"] == pytest.approx(2.5)
    assert r.effect["p95_diff"] == pytest.approx(3.0)


def test_mann_whitney_hand_computed_with_ties():
    # pooled 1,2,2,2,3,4 -> ranks 1,3,3,3,5,6; R_A = 7, U_A = 1; one tie group of 3: sum(t^3-t) = 24
    r = compare_latency([1.0, 2.0, 2.0], [2.0, 3.0, 4.0], min_samples=1)
    assert r.statistic == 1.0
    var = 3 * 3 / 12 * (7 - 24 / (6 * 5))
    assert r.z == pytest.approx(-(3.5 - 0.5) / math.sqrt(var))
    assert r.p_value == pytest.approx(_p2(3.0 / math.sqrt(var)))


def test_identical_samples_give_p_one_and_all_equal_values_too():
    rng = np.random.default_rng(1)
    x = rng.lognormal(2.3, 0.4, 200)
    r = compare_latency(x, x.copy())
    assert r.p_value == pytest.approx(1.0, abs=1e-9)
    assert not r.significant
    assert r.effect["median_ratio"] == 1.0
    same = compare_latency([5.0] * 30, [5.0] * 30)
    assert same.p_value == 1.0 and same.z == 0.0 and not same.significant
    assert "same median" in same.reason


def test_clearly_slower_b_is_significant_with_a_readable_reason():
    rng = np.random.default_rng(2)
    a = rng.lognormal(np.log(10.0), 0.3, 480)
    b = rng.lognormal(np.log(12.5), 0.3, 120)
    r = compare_latency(a, b)
    assert r.p_value < 1e-6 and r.significant
    assert r.n_a == 480 and r.n_b == 120
    assert r.effect["median_ratio"] > 1.1 and r.effect["p95_diff"] > 0
    assert r.reason.startswith("B is slower: median ")
    assert "Mann–Whitney p" in r.reason and "(n = 480 / 120)" in r.reason
    assert r.reason.endswith("significant at α = 0.05") and "not significant" not in r.reason
    # the other way round: B is faster, with the same p-value
    rev = compare_latency(b, a)
    assert rev.reason.startswith("B is faster") and rev.p_value == pytest.approx(r.p_value)
    assert rev.z == pytest.approx(-r.z)


def test_same_distribution_is_usually_not_significant():
    rng = np.random.default_rng(3)
    hits = sum(
        compare_latency(rng.lognormal(2.3, 0.5, 100), rng.lognormal(2.3, 0.5, 100)).significant
        for _ in range(200)
    )
    assert hits <= 25  # about 5 % false positives at alpha = 0.05


def test_too_few_samples_is_never_significant():
    r = compare_latency([10.0] * 5 + [11.0] * 5, [50.0] * 10)
    assert r.p_value < 0.05
    assert not r.significant
    assert "too few samples: n = 10 / 10" in r.reason and "20" in r.reason
    ok = compare_latency([10.0] * 5 + [11.0] * 5, [50.0] * 10, min_samples=10)
    assert ok.significant


def test_to_dict_is_json_ready_and_result_is_frozen():
    r = compare_latency([1.0, 2.0, 3.0] * 10, [2.0, 3.0, 4.0] * 10)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["test"] == "mann-whitney-u" and d["n_a"] == 30 and d["effect"]["median_b"] == 3.0
    assert set(d) >= {"statistic", "p_value", "significant", "reason", "alpha"}
    with pytest.raises(AttributeError):
        r.p_value = 0.0  # type: ignore[misc]
    assert isinstance(r, TestResult)


@pytest.mark.parametrize(
    ("a", "b", "alpha", "word"),
    [
        ([], [1.0], 0.05, "a_ms is empty"),
        ([1.0], [float("nan")], 0.05, "b_ms[0]"),
        ([1.0, -2.0], [1.0], 0.05, "a_ms[1]"),
        ([1.0], [1.0], 1.5, "alpha"),
        ([[1.0]], [1.0], 0.05, "flat"),
    ],
)
def test_bad_latency_inputs_name_the_value(a, b, alpha, word):
    with pytest.raises(ConfigError, match=word.replace("[", r"\[").replace("]", r"\]")):
        compare_latency(a, b, alpha)


def test_mann_whitney_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    for k in range(20):
        n_a, n_b = int(rng.integers(5, 300)), int(rng.integers(5, 300))
        a = np.round(rng.lognormal(2.3, 0.5, n_a), 1)  # rounding makes ties
        b = np.round(rng.lognormal(2.3 + 0.02 * k, 0.5, n_b), 1)
        ours = compare_latency(a, b)
        ref = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
        assert ours.statistic == pytest.approx(ref.statistic)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)


# ------------------------------------------------------------------------------------------ rates


def test_two_proportion_hand_computed():
    r = compare_rates(10, 100, 20, 100, metric="error rate")
    pooled = 0.15
    se = math.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert r.z == pytest.approx(0.1 / se)
    assert r.p_value == pytest.approx(_p2(0.1 / se))
    assert r.p_value == pytest.approx(0.0477, abs=1e-4)
    assert r.significant
    half = 1.959963984540054 * math.sqrt(0.1 * 0.9 / 100 + 0.2 * 0.8 / 100)
    assert r.effect["diff"] == pytest.approx(0.1)
    assert r.effect["ci_low"] == pytest.approx(0.1 - half)
    assert r.effect["ci_high"] == pytest.approx(0.1 + half)
    assert r.reason.startswith("B's error rate is higher: 20 % vs 10 %")
    assert "(n = 100 / 100)" in r.reason and "95 % CI" in r.reason


def test_rates_edge_cases():
    same = compare_rates(0, 50, 0, 50)
    assert same.p_value == 1.0 and not same.significant and same.effect["diff"] == 0.0
    full = compare_rates(50, 50, 50, 50)
    assert full.p_value == 1.0
    few = compare_rates(0, 10, 10, 10)
    assert few.p_value < 1e-3 and not few.significant and "too few samples" in few.reason
    lower = compare_rates(90, 100, 60, 100, metric="accuracy")
    assert lower.significant and "accuracy is lower" in lower.reason and lower.effect["ci_high"] < 0


@pytest.mark.parametrize(
    ("args", "word"),
    [
        ((5, 0, 1, 10), "a_n"),
        ((11, 10, 1, 10), "a_success"),
        ((1, 10, -1, 10), "b_success"),
        ((1, 10, 1, 2.5), "b_n"),
    ],
)
def test_bad_rate_inputs_name_the_value(args, word):
    with pytest.raises(ConfigError, match=word):
        compare_rates(*args)


def test_two_proportion_matches_scipy_chi2():
    stats = pytest.importorskip("scipy.stats")
    for a_s, a_n, b_s, b_n in [(10, 100, 20, 100), (3, 400, 9, 120), (450, 500, 100, 120)]:
        table = [[a_s, a_n - a_s], [b_s, b_n - b_s]]
        chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
        r = compare_rates(a_s, a_n, b_s, b_n)
        assert r.z**2 == pytest.approx(chi2)
        assert r.p_value == pytest.approx(p, rel=1e-9)


# ------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5, 0.9])
def test_split_share_is_close_to_requested(share):
    keys = [f"robot-{i}" for i in range(10_000)]
    observed = sum(split(k, share) for k in keys) / len(keys)
    assert abs(observed - share) < 0.01


def test_split_is_deterministic_and_salted():
    keys = [f"req-{i}" for i in range(2000)]
    first = [split(k, 0.2) for k in keys]
    assert first == [split(k, 0.2) for k in keys]
    salted = [split(k, 0.2, salt="ab-7") for k in keys]
    assert salted != first
    assert salted == [split(k, 0.2, salt="ab-7") for k in keys]
    # growing the share only moves keys from A to B (monotone), never back
    assert all(split(k, 0.5) for k, b in zip(keys, first, strict=True) if b)
    assert not any(split(k, 0.0) for k in keys) and all(split(k, 1.0) for k in keys)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), True, "20%"])
def test_split_rejects_bad_share(share):
    with pytest.raises(ConfigError, match="share"):
        split("robot-1", share)
