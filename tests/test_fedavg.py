"""Federated personalisation of a head layer (scheduler/fedavg.py): the exact weighted mean, local
softmax-regression fine-tuning, and FedAvg over non-IID nodes (synthetic blobs and sklearn's digits)
against a start head and a head trained on the pooled data (the upper bound)."""

from __future__ import annotations

import numpy as np
import pytest

from meshai.errors import ConfigError
from scheduler.fedavg import fedavg, finetune_head, head_accuracy, head_logits

NAMES = ("fc.weight", "fc.bias")
GROUPS = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))  # the classes each node sees mostly


def _head(rng: np.random.Generator, n_in: int, n_out: int = 10) -> dict[str, np.ndarray]:
    return {
        NAMES[0]: (rng.standard_normal((n_out, n_in)) * 0.01).astype(np.float32),
        NAMES[1]: np.zeros(n_out, np.float32),
    }


def _blobs(
    rng: np.random.Generator, n: int, means: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(means), n)
    return (means[y] + noise * rng.standard_normal((n, means.shape[1]))).astype(np.float32), y


def _non_iid(rng: np.random.Generator, y: np.ndarray, own: float = 0.9) -> list[np.ndarray]:
    """Indices per node: a sample of class c goes to the node owning c with probability ``own``,
    otherwise to one of the other nodes."""
    owner = {c: i for i, g in enumerate(GROUPS) for c in g}
    nodes: list[list[int]] = [[] for _ in GROUPS]
    for j, c in enumerate(y):
        i = owner[int(c)]
        if rng.random() >= own:
            i = int(rng.choice([k for k in range(len(GROUPS)) if k != i]))
        nodes[i].append(j)
    return [np.array(n) for n in nodes]


def _federate(
    start: dict[str, np.ndarray],
    data: list[tuple[np.ndarray, np.ndarray]],
    rounds: int,
    epochs: int,
    lr: float,
) -> dict[str, np.ndarray]:
    head = start
    for r in range(rounds):
        updates = [
            (finetune_head(head, x, y, names=NAMES, epochs=epochs, lr=lr, seed=100 * r + i), len(y))
            for i, (x, y) in enumerate(data)
        ]
        for upd, _ in updates:  # only the head leaves a node, never data
            assert set(upd) == set(NAMES)
        head = fedavg(updates)
    return head


# ----------------------------------------------------------------------------------------- fedavg


def test_fedavg_is_the_exact_sample_weighted_mean():
    rng = np.random.default_rng(0)
    ws = [{"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)} for _ in range(4)]
    ns = [10, 0, 30, 60]
    out = fedavg(list(zip(ws, ns, strict=True)))
    for k in ("w", "b"):
        expect = sum(n * w[k] for w, n in zip(ws, ns, strict=True)) / 100
        np.testing.assert_allclose(out[k], expect, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(out[k], np.average([w[k] for w in ws], axis=0, weights=ns), rtol=1e-12)
        assert out[k].dtype == np.float64
    one = fedavg([(ws[0], 5)])
    assert all(np.array_equal(one[k], ws[0][k]) for k in ws[0])
    f32 = fedavg([({"w": np.ones(2, np.float32)}, 1), ({"w": np.full(2, 4, np.float32)}, 2)])
    assert f32["w"].dtype == np.float32 and np.array_equal(f32["w"], np.full(2, 3, np.float32))


@pytest.mark.parametrize(
    ("updates", "word"),
    [
        ([], "at least one update"),
        ([({"w": np.ones(2)}, 0), ({"w": np.ones(2)}, 0)], "0 samples"),
        ([({"w": np.ones(2)}, 1), ({"w": np.ones(3)}, 1)], "'w' has shape"),
        ([({"w": np.ones(2)}, 1), ({"w": np.ones(2, np.float32)}, 1)], "'w' has dtype"),
        ([({"w": np.ones(2)}, 1), ({"v": np.ones(2)}, 1)], "lacks tensor\\(s\\) 'w'"),
        ([({"w": np.ones(2, np.int64)}, 1)], "'w' has dtype int64"),
        ([({"w": np.ones(2)}, -1)], "sample count"),
    ],
)
def test_fedavg_rejects_mismatches_naming_the_tensor(updates, word):
    with pytest.raises(ConfigError, match=word):
        fedavg(updates)


# -------------------------------------------------------------------------------------- fine-tune


def test_finetune_raises_accuracy_and_is_deterministic():
    rng = np.random.default_rng(1)
    means = rng.standard_normal((10, 20)) * 2.0
    x, y = _blobs(rng, 1000, means, 1.0)
    start = _head(rng, 20)
    before = head_accuracy(start, x, y, names=NAMES)
    tuned = finetune_head(start, x, y, names=NAMES, epochs=5, lr=0.1, seed=3)
    after = head_accuracy(tuned, x, y, names=NAMES)
    assert before < 0.3 and after > 0.9
    assert set(tuned) == set(NAMES)
    assert tuned[NAMES[0]].dtype == np.float32 and tuned[NAMES[0]].shape == (10, 20)
    again = finetune_head(start, x, y, names=NAMES, epochs=5, lr=0.1, seed=3)
    assert all(np.array_equal(tuned[k], again[k]) for k in NAMES)
    other = finetune_head(start, x, y, names=NAMES, epochs=5, lr=0.1, seed=4)
    assert not np.array_equal(tuned[NAMES[0]], other[NAMES[0]])
    # the input weights are left alone; epochs=0 returns them unchanged
    assert np.abs(start[NAMES[0]]).max() < 0.1
    same = finetune_head(start, x, y, names=NAMES, epochs=0, lr=0.1, seed=0)
    assert all(np.array_equal(same[k], start[k]) for k in NAMES)


def test_finetune_with_untransposed_gemm_layout_matches():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, 200, rng.standard_normal((10, 8)) * 2, 1.0)
    start = _head(rng, 8)
    flat = {NAMES[0]: start[NAMES[0]].T.copy(), NAMES[1]: start[NAMES[1]]}
    a = finetune_head(start, x, y, names=NAMES, epochs=2, lr=0.1, seed=0)
    b = finetune_head(flat, x, y, names=NAMES, epochs=2, lr=0.1, seed=0, trans_b=False)
    np.testing.assert_allclose(a[NAMES[0]], b[NAMES[0]].T, rtol=1e-6)
    np.testing.assert_allclose(
        head_logits(a, x, names=NAMES), head_logits(b, x, names=NAMES, trans_b=False), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"names": ("nope", NAMES[1])}, "'nope'"),
        ({"features": np.ones((4, 3), np.float32)}, "features must have shape"),
        ({"labels": np.array([0, 1, 2, 10])}, "label 10"),
        ({"labels": np.array([0.0, 1.0, 2.0, 3.0])}, "integers"),
        ({"lr": 0.0}, "lr"),
        ({"epochs": -1}, "epochs"),
    ],
)
def test_finetune_rejects_bad_input(kwargs, word):
    rng = np.random.default_rng(0)
    args = {
        "weights": _head(rng, 5),
        "features": np.ones((4, 5), np.float32),
        "labels": np.array([0, 1, 2, 3]),
        "names": NAMES,
        "epochs": 1,
        "lr": 0.1,
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=word):
        finetune_head(**args)


# ---------------------------------------------------------------------------------- non-IID FedAvg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedavg_on_non_iid_blobs_beats_start_and_approaches_pooled(seed):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((10, 20)) * 0.7  # overlapping classes: pooled accuracy ~0.85
    x, y = _blobs(rng, 3000, means, 1.0)
    xt, yt = _blobs(rng, 2000, means, 1.0)
    parts = _non_iid(rng, y)
    data = [(x[p], y[p]) for p in parts]
    for _, yi in data:  # each node sees mostly 3-4 classes
        top = np.sort(np.bincount(yi, minlength=10))[::-1]
        assert top[:4].sum() / len(yi) > 0.8
    start = _head(rng, 20)
    before = head_accuracy(start, xt, yt, names=NAMES)
    fed = _federate(start, data, rounds=10, epochs=1, lr=0.1)
    after = head_accuracy(fed, xt, yt, names=NAMES)
    pooled = head_accuracy(
        finetune_head(start, x, y, names=NAMES, epochs=10, lr=0.1, seed=7), xt, yt, names=NAMES
    )
    local_only = [
        head_accuracy(
            finetune_head(start, xi, yi, names=NAMES, epochs=10, lr=0.1, seed=7), xt, yt, names=NAMES
        )
        for xi, yi in data
    ]
    assert after > before + 0.4
    assert after <= pooled + 0.02  # the pooled head is the upper bound
    assert after > pooled - 0.1
    assert after > max(local_only) + 0.1  # federation beats any node training alone


def test_fedavg_on_non_iid_digits_raises_global_and_per_node_accuracy():
    datasets = pytest.importorskip("sklearn.datasets")
    xs, ys = datasets.load_digits(return_X_y=True)
    x_all, y_all = (np.asarray(xs, np.float32) / 16.0), np.asarray(ys, np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x_all))
    tr, te = order[:1200], order[1200:]
    x, y, xt, yt = x_all[tr], y_all[tr], x_all[te], y_all[te]
    parts = _non_iid(rng, y)
    test_parts = _non_iid(rng, yt)  # each node's own (non-IID) test data
    data = [(x[p], y[p]) for p in parts]
    start = _head(rng, 64)
    fed = _federate(start, data, rounds=10, epochs=2, lr=0.5)
    pooled = finetune_head(start, x, y, names=NAMES, epochs=20, lr=0.5, seed=7)
    before = head_accuracy(start, xt, yt, names=NAMES)
    after = head_accuracy(fed, xt, yt, names=NAMES)
    upper = head_accuracy(pooled, xt, yt, names=NAMES)
    assert after > before + 0.5 and after > 0.85
    assert after <= upper + 0.02 and after > upper - 0.08
    for p in test_parts:
        node_before = head_accuracy(start, xt[p], yt[p], names=NAMES)
        node_after = head_accuracy(fed, xt[p], yt[p], names=NAMES)
        assert node_after > node_before + 0.5
