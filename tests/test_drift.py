"""Drift statistics from histograms against scipy's exact values, streaming alarms, prediction drift,
the reference's JSON round trip and argument checks (meshai/drift.py)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from meshai.drift import (
    PSI_EPSILON,
    DriftMonitor,
    FeatureSpec,
    Reference,
    Thresholds,
    prediction_features,
    summarise_inputs,
)
from meshai.errors import ConfigError

Sampler = Callable[[np.random.Generator, int], np.ndarray]

DISTRIBUTIONS: dict[str, Sampler] = {
    "normal": lambda r, n: r.normal(0.0, 1.0, n),
    "shifted": lambda r, n: r.normal(0.5, 1.0, n),
    "scaled": lambda r, n: r.normal(0.0, 1.5, n),
    "bimodal": lambda r, n: np.where(r.random(n) < 0.5, r.normal(-2.0, 0.7, n), r.normal(2.0, 0.7, n)),
    "bimodal_shifted": lambda r, n: np.where(
        r.random(n) < 0.3, r.normal(-2.0, 0.7, n), r.normal(2.3, 0.7, n)
    ),
    "uniform": lambda r, n: r.uniform(-2.0, 2.0, n),
    "uniform_shifted": lambda r, n: r.uniform(-1.5, 2.5, n),
}

# (reference, live) pairs.  Stated tolerances (20 bins, reference of 2,000, live of 500 and 2,000):
#   PSI          equal to the direct computation on the same bins (1e-9 relative);
#   KS           0 <= exact - binned <= 0.025, and <= the largest single-bin mass (a proven bound);
#   Wasserstein  |exact - binned| <= 0.02 σ_ref + 2 % of exact; 0.04 σ_ref for a uniform against a
#                normal reference, whose CDFs cross inside the reference's open tail bins.
PAIRS = [
    ("normal", "normal", 0.02),
    ("normal", "shifted", 0.02),
    ("normal", "scaled", 0.02),
    ("normal", "bimodal", 0.02),
    ("normal", "uniform", 0.04),
    ("bimodal", "bimodal", 0.02),
    ("bimodal", "bimodal_shifted", 0.02),
    ("bimodal", "normal", 0.02),
    ("uniform", "uniform", 0.02),
    ("uniform", "uniform_shifted", 0.02),
    ("uniform", "normal", 0.02),
]
KS_TOL = 0.025
W_REL_TOL = 0.02
BINS = 20


def _direct_psi(ref: np.ndarray, live: np.ndarray, bins: int) -> float:
    """PSI written out from its definition: quantile bins of the reference, right-closed, open ends."""
    edges = np.unique(np.quantile(ref, np.arange(1, bins) / bins))
    bounds = [-math.inf, *edges.tolist(), math.inf]
    total = 0.0
    for lo, hi in itertools.pairwise(bounds):
        p = max(float(np.mean((ref > lo) & (ref <= hi))), PSI_EPSILON)
        q = max(float(np.mean((live > lo) & (live <= hi))), PSI_EPSILON)
        total += (q - p) * math.log(q / p)
    return total


_worst: dict[str, float] = {}


@pytest.mark.parametrize(("ref_kind", "live_kind", "w_abs_tol"), PAIRS)
def test_histogram_statistics_agree_with_scipy(ref_kind: str, live_kind: str, w_abs_tol: float) -> None:
    for seed in range(8):
        rng = np.random.default_rng(seed)
        ref = DISTRIBUTIONS[ref_kind](rng, 2000)
        reference = Reference.from_samples(ref[:, None], bins=BINS)
        for n in (500, 2000):
            live = DISTRIBUTIONS[live_kind](rng, n)
            s = reference.score(live[:, None])["f0"]
            where = f"{ref_kind} vs {live_kind}, seed {seed}, n {n}"

            assert s["psi"] == pytest.approx(_direct_psi(ref, live, BINS), rel=1e-9, abs=1e-12), where

            ks = float(stats.ks_2samp(ref, live).statistic)
            counts, _ = reference.histogram(live[:, None])
            max_bin_mass = max(max(reference.features[0].counts) / 2000, counts.max() / n)
            assert -1e-12 <= ks - s["ks"] <= min(KS_TOL, max_bin_mass + 1e-12), (where, ks, s["ks"])

            w = float(stats.wasserstein_distance(ref, live))
            tol = w_abs_tol * ref.std() + W_REL_TOL * w
            assert abs(w - s["wasserstein"]) <= tol, (where, w, s["wasserstein"])

            _worst["ks"] = max(_worst.get("ks", 0.0), ks - s["ks"])
            _worst["w_sigma"] = max(_worst.get("w_sigma", 0.0), abs(w - s["wasserstein"]) / ref.std())


def test_report_measured_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the worst gaps the agreement test measured (run after it, in file order)."""
    if _worst:
        with capsys.disabled():
            print(
                f"\ndrift vs scipy over {len(PAIRS)} pairs × 8 seeds × 2 sizes: worst KS gap "
                f"{_worst['ks']:.4f}, worst |ΔW| {_worst['w_sigma']:.4f} σ_ref"
            )


def test_shifted_distributions_score_high_and_identical_ones_low() -> None:
    rng = np.random.default_rng(0)
    reference = Reference.from_samples(rng.normal(0, 1, (5000, 1)))
    same = reference.score(rng.normal(0, 1, (5000, 1)))["f0"]
    moved = reference.score(rng.normal(1.0, 1, (5000, 1)))["f0"]
    assert same["psi"] < 0.02 and same["ks"] < 0.03 and same["wasserstein"] < 0.05
    assert moved["psi"] > 0.8 and moved["ks"] > 0.35
    assert moved["wasserstein"] == pytest.approx(1.0, abs=0.05)


# --------------------------------------------------------------------------------------------------
# Streaming: alarms on a 0.5 σ shift, silence on an unshifted stream.

MU = np.array([0.0, 5.0, -3.0, 100.0])
SD = np.array([1.0, 2.0, 0.3, 15.0])
NAMES = ["cam.c0.mean", "cam.c1.mean", "cam.c2.mean", "imu.mean"]


def _draw(rng: np.random.Generator, n: int, shift_sigma: float = 0.0) -> np.ndarray:
    x = rng.normal(MU, SD, (n, len(MU)))
    x[:, 1] += shift_sigma * SD[1]
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unshifted_stream_of_5000_never_alarms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    monitor = DriftMonitor(Reference.from_samples(_draw(rng, 2000), names=NAMES))
    stream = _draw(rng, 5000)
    for i in range(len(stream)):  # checked after every single request
        monitor.update(stream[i : i + 1])
        assert monitor.drifted() == [], (seed, i, monitor.scores())
    assert monitor.ready and monitor.seen == 5000
    assert 451 <= monitor.count <= 500


@pytest.mark.parametrize("seed", [10, 11, 12, 13, 14])
def test_half_sigma_shift_alarms_within_500_requests(seed: int) -> None:
    """Counting: the monitor is warm (1,000 unshifted requests, no alarm); then shifted requests arrive
    one at a time and ``drifted()`` is read after each; the count is the number of shifted requests fed
    when the shifted feature first appears.  The other features never appear, over 1,000 shifted ones."""
    rng = np.random.default_rng(seed)
    monitor = DriftMonitor(Reference.from_samples(_draw(rng, 2000), names=NAMES))
    monitor.update(_draw(rng, 1000))
    assert monitor.ready and monitor.drifted() == []
    shifted = _draw(rng, 1000, shift_sigma=0.5)
    first = None
    for i in range(len(shifted)):
        monitor.update(shifted[i : i + 1])
        flagged = monitor.drifted()
        assert set(flagged) <= {"cam.c1.mean"}, (seed, i, flagged)
        if flagged and first is None:
            first = i + 1
    assert first is not None and first <= 500, (seed, first)
    s = monitor.scores()
    assert s["cam.c1.mean"]["wasserstein"] == pytest.approx(0.5 * SD[1], abs=0.15 * SD[1])


def test_image_channel_shift_end_to_end() -> None:
    """Raw NCHW images → per-channel means → reference; a 0.5 σ brightness shift of one channel alarms."""
    rng = np.random.default_rng(3)

    def images(n: int, shift: float = 0.0) -> np.ndarray:
        brightness = rng.normal(0.0, 0.05, (n, 1, 3, 1, 1))
        x = rng.normal(0.5, 0.2, (n, 1, 3, 8, 8)) + brightness  # one request = a (1, 3, 8, 8) tensor
        x[:, :, 2] += shift
        return x

    ref_features = summarise_inputs({"cam": images(2000)})
    assert list(ref_features) == ["cam.c0.mean", "cam.c1.mean", "cam.c2.mean"]
    reference = Reference.from_samples(ref_features)
    sigma = reference.features[2].std
    monitor = DriftMonitor(reference)
    monitor.update(summarise_inputs({"cam": images(600)}))
    assert monitor.drifted() == []
    for _ in range(10):  # 10 batches of 50 requests, checked after each batch
        monitor.update(summarise_inputs({"cam": images(50, shift=0.5 * sigma)}))
    assert monitor.drifted() == ["cam.c2.mean"]


def test_batched_and_single_updates_give_the_same_window() -> None:
    rng = np.random.default_rng(4)
    reference = Reference.from_samples(_draw(rng, 1000), names=NAMES)
    x = _draw(rng, 1234)
    one, many = DriftMonitor(reference), DriftMonitor(reference)
    for i in range(len(x)):
        one.update(x[i : i + 1])
    many.update(x[:700])
    many.update({n: x[700:, j] for j, n in enumerate(NAMES)})
    for a, b in zip(one.histogram(), many.histogram(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # 1234 = 24 full blocks of 50 and 34: the window is 9 full blocks and the partial one.
    assert one.count == many.count == 9 * 50 + 34
    expected = reference.score(x[-(9 * 50 + 34) :])
    for name, scores in one.scores().items():
        assert scores == pytest.approx(expected[name], rel=1e-9, abs=1e-12)


def test_window_memory_does_not_grow_with_window() -> None:
    rng = np.random.default_rng(5)
    reference = Reference.from_samples(_draw(rng, 1000), names=NAMES)
    small, large = DriftMonitor(reference, window=100), DriftMonitor(reference, window=100_000)
    assert small.histogram()[0].shape == large.histogram()[0].shape == (4, 20)
    assert small.scores() == {} and small.drifted() == [] and not small.ready
    small.update(_draw(rng, 100))
    report = small.report()
    assert report["ready"] and report["count"] == 100 and set(report["scores"]) == set(NAMES)
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# Prediction drift


def _classifier_outputs(rng: np.random.Generator, n: int, prior: np.ndarray, temperature: float = 1.0):
    classes = rng.choice(len(prior), size=n, p=prior)
    logits = rng.normal(0.0, 1.0, (n, 1, len(prior)))  # one request returns a (1, classes) tensor
    logits[np.arange(n), 0, classes] += 4.0
    z = logits / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_prediction_drift_on_categorical_outputs() -> None:
    rng = np.random.default_rng(6)
    k = 10
    uniform = np.full(k, 1.0 / k)
    ref_cols = prediction_features(_classifier_outputs(rng, 3000, uniform), name="logits")
    assert set(ref_cols) == {"logits.argmax", "logits.max_prob"}
    reference = Reference.from_samples(ref_cols, categorical={"logits.argmax": k})
    assert reference.features[0].spec == FeatureSpec("logits.argmax", "categorical", k)

    calm = DriftMonitor(reference)
    for _ in range(20):
        calm.update(prediction_features(_classifier_outputs(rng, 100, uniform), name="logits"))
    assert calm.drifted() == []

    skewed = np.full(k, 0.6 / (k - 1))
    skewed[3] = 0.4
    live = prediction_features(_classifier_outputs(rng, 500, skewed), name="logits")
    monitor = DriftMonitor(reference)
    monitor.update(live)
    assert monitor.drifted() == ["logits.argmax"]

    # The categorical statistics, written out.
    p = np.bincount(ref_cols["logits.argmax"].astype(int), minlength=k) / 3000
    q = np.bincount(live["logits.argmax"].astype(int), minlength=k) / 500
    pe, qe = np.maximum(p, PSI_EPSILON), np.maximum(q, PSI_EPSILON)
    s = monitor.scores()["logits.argmax"]
    assert s["psi"] == pytest.approx(float(np.sum((qe - pe) * np.log(qe / pe))), rel=1e-9)
    assert s["ks"] == pytest.approx(float(np.abs(p - q).max()), rel=1e-9)
    assert s["wasserstein"] == pytest.approx(0.5 * float(np.abs(p - q).sum()), rel=1e-9)
    assert s["psi"] > 0.2 and s["ks"] > 0.25


def test_less_confident_model_drifts_max_prob_not_argmax() -> None:
    rng = np.random.default_rng(7)
    prior = np.full(5, 0.2)
    reference = Reference.from_samples(
        prediction_features(_classifier_outputs(rng, 3000, prior)), categorical={"output.argmax": 5}
    )
    monitor = DriftMonitor(reference)
    logits = np.log(_classifier_outputs(rng, 500, prior, temperature=2.0))
    monitor.update(prediction_features(logits, logits=True))
    assert monitor.drifted() == ["output.max_prob"]


# --------------------------------------------------------------------------------------------------
# Features from raw tensors


def test_summarise_inputs_layouts_and_stats() -> None:
    rng = np.random.default_rng(8)
    nchw = rng.normal(size=(7, 1, 3, 4, 5)).astype(np.float32)
    nhwc = np.moveaxis(nchw, 2, -1)
    a = summarise_inputs({"x": nchw}, stats=("mean", "std"))
    b = summarise_inputs({"x": nhwc}, layout="NHWC", stats=("mean", "std"))
    assert list(a) == [f"x.c{k}.{s}" for s in ("mean", "std") for k in range(3)]
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12)
    np.testing.assert_allclose(a["x.c1.mean"], nchw[:, 0, 1].reshape(7, -1).mean(axis=1), rtol=1e-6)
    chw = summarise_inputs({"x": nchw[:, 0]})  # a request tensor without its own batch axis
    np.testing.assert_allclose(chw["x.c2.mean"], a["x.c2.mean"])
    vec = summarise_inputs({"v": rng.normal(size=(7, 1, 16)), "s": np.arange(7)}, layout={"v": "NCHW"})
    assert list(vec) == ["v.mean", "v.std", "s.mean", "s.std"]
    assert vec["s.mean"].tolist() == list(range(7)) and not vec["s.std"].any()


# --------------------------------------------------------------------------------------------------
# JSON round trip and bad arguments


def test_reference_json_round_trip() -> None:
    rng = np.random.default_rng(9)
    cols = {
        "a": rng.normal(size=800),
        "const": np.full(800, 3.0),  # ties collapse to one edge
        "ties": rng.integers(0, 3, 800).astype(float),
        "cls": rng.integers(0, 4, 800).astype(float),
    }
    reference = Reference.from_samples(cols, categorical={"cls": 4}, bins=10)
    assert reference.features[1].edges == (3.0,)
    text = json.dumps(reference.to_dict(), allow_nan=False)
    again = Reference.from_dict(json.loads(text))
    assert again == reference
    live = {k: v[:300] + (0.3 if k == "a" else 0.0) for k, v in cols.items()}
    assert again.score(live) == reference.score(live)


BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: Reference.from_samples(np.zeros((50, 2)), bins=1), "bins must be an int >= 2, got 1"),
    (lambda: Reference.from_samples(np.zeros((5, 2))), "at least 20 samples, got 5"),
    (lambda: Reference.from_samples(np.zeros(50)), "got shape (50,)"),
    (lambda: Reference.from_samples(np.zeros((50, 2)), names=["a"]), "2 features but 1 names"),
    (lambda: Reference.from_samples(np.array([[0.0]] * 29 + [[math.nan]])), "'f0' holds 1 non-finite"),
    (lambda: Reference.from_samples({"a": np.zeros(30)}, categorical={"b": 3}), "'b'"),
    (lambda: Reference.from_samples({"a": np.full(30, 7.0)}, categorical={"a": 3}), "got value 7.0"),
    (lambda: Reference.from_samples({"a": np.zeros(30), "b": np.zeros(29)}), "a=30, b=29"),
    (lambda: Reference.from_samples({"a": np.array(["x"] * 30)}), "dtype <U1"),
    (lambda: FeatureSpec(""), "got ''"),
    (lambda: FeatureSpec("a", "ordinal"), "got 'ordinal'"),
    (lambda: FeatureSpec("a", "categorical", 1), "categories >= 2, got 1"),
    (lambda: Thresholds(psi=-0.1), "psi must be a number > 0, got -0.1"),
    (lambda: Thresholds(ks=math.nan), "ks must be a number > 0, got nan"),
    (lambda: Reference.from_dict({"version": 2, "features": []}), "version must be 1, got 2"),
    (lambda: Reference.from_dict({"version": 1, "features": [{"name": "a"}]}), "lacks key 'edges'"),
    (
        lambda: Reference.from_dict(
            {
                "version": 1,
                "features": [
                    {
                        "name": "a",
                        "edges": [1.0, 0.0],
                        "counts": [1, 1, 1],
                        "offsets": [0, 0, 0],
                        "mean": 0,
                        "std": 1,
                    }
                ],
            }
        ),
        "edges must increase strictly, got (1.0, 0.0)",
    ),
    (lambda: summarise_inputs({"x": np.zeros((2, 3, 4, 5))}, layout="CHWN"), "got 'CHWN'"),
    (lambda: summarise_inputs({"x": np.zeros((2, 3))}, stats=("median",)), "('median',)"),
    (lambda: prediction_features(np.full((4, 3), 0.5)), "row 0 sums to 1.5"),
    (lambda: prediction_features(np.zeros(4)), "got shape (4,)"),
]


@pytest.mark.parametrize(("call", "message"), BAD)
def test_bad_arguments_raise_config_error_naming_the_value(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert message in str(info.value)


def test_monitor_bad_arguments_and_batches() -> None:
    reference = Reference.from_samples(np.random.default_rng(0).normal(size=(100, 2)), names=["a", "b"])
    for kwargs, message in [
        ({"window": 0}, "window must be an int >= 1, got 0"),
        ({"window": 105}, "multiple of blocks (10), got 105"),
        ({"blocks": 0}, "blocks must be an int >= 1, got 0"),
        ({"min_samples": 501}, "got 501"),
        ({"thresholds": {"psi": 0.1}}, "{'psi': 0.1}"),
    ]:
        with pytest.raises(ConfigError) as info:
            DriftMonitor(reference, **kwargs)  # type: ignore[arg-type]
        assert message in str(info.value)
    monitor = DriftMonitor(reference)
    for batch, message in [
        (np.zeros((3, 3)), "batch has 3 features, the reference has 2"),
        ({"a": np.zeros(3)}, "feature 'b' is missing"),
        ({"a": np.zeros(3), "b": np.zeros(3), "c": np.zeros(3)}, "unknown feature 'c'"),
        (np.array([[0.0, math.inf]]), "'b' holds 1 non-finite value(s), e.g. inf"),
    ]:
        with pytest.raises(ConfigError) as info:
            monitor.update(batch)
        assert message in str(info.value)
    assert monitor.seen == 0
