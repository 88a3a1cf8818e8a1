"""Federated personalisation of a head layer (scheduler/fedavg.py): the exact weighted mean, local
softmax-regression fine-tuning, and FedAvg over non-IID nodes (synthetic blobs and sklearn's digits)
against a start head and a head trained on the pooled data (the upper bound); finding the head of an
ONNX model and replacing its weights (scheduler/head.py); a node's split and the head's wire form."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from meshai.errors import ConfigError
from scheduler.fedavg import (
    fedavg,
    finetune_head,
    head_accuracy,
    head_from_wire,
    head_logits,
    head_to_wire,
    local_split,
)
from scheduler.head import find_head, head_weights, with_head

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


# ------------------------------------------------------------------------ the head of an ONNX model


def _mlp(*, matmul: bool = False, softmax: bool = False, outputs: int = 1) -> onnx.ModelProto:
    """in [N,4] → Gemm fc1 + Relu → head (Gemm fc2, or MatMul mm + Add) [N,3] (→ Softmax)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(5, np.float32), "b1"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["in", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
    ]
    last = "probs" if softmax else "logits"
    head_out = "z" if softmax else "logits"
    if matmul:
        inits.append(numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "w2"))
        nodes += [
            helper.make_node("MatMul", ["r1", "w2"], ["mm_out"], name="mm"),
            helper.make_node("Add", ["mm_out", "b2"], [head_out], name="add"),
        ]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((3, 5)).astype(np.float32), "w2"))
        nodes.append(helper.make_node("Gemm", ["r1", "w2", "b2"], [head_out], name="fc2", transB=1))
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], ["probs"], name="softmax"))
    outs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 3])]
    if outputs == 2:
        outs.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", 5]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("in", TensorProto.FLOAT, ["N", 4])],
        outs,
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_find_head_automatically_and_by_name():
    gemm = find_head(_mlp())
    assert (gemm.node, gemm.names, gemm.trans_b, gemm.features, gemm.output) == (
        "fc2", ("w2", "b2"), True, "r1", "logits"
    )  # fmt: skip
    assert find_head(_mlp(), "fc2") == gemm
    mm = find_head(_mlp(matmul=True, softmax=True))
    assert (mm.node, mm.names, mm.trans_b, mm.features, mm.output) == (
        "mm",
        ("w2", "b2"),
        False,
        "r1",
        "probs",
    )
    assert find_head(_mlp(matmul=True, softmax=True), "mm") == mm
    assert find_head(_mlp(outputs=2), "fc2").output == "logits"


@pytest.mark.parametrize(
    ("model", "name", "words"),
    [
        (_mlp(), "fc9", "no node named 'fc9' (its Gemm/MatMul nodes: fc1, fc2)"),
        (_mlp(), "relu1", "'relu1' (Relu) is not a Gemm or MatMul head layer"),
        (_mlp(), "fc1", "'fc1' (Gemm) does not feed a graph output: 'h1' goes through 'relu1' (Relu)"),
        (_mlp(outputs=2), None, "model has 2 outputs; name its head layer"),
    ],
)
def test_find_head_says_what_is_wrong(model, name, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        find_head(model, name)


def test_find_head_refuses_a_model_without_one():
    m = _mlp()
    m.graph.node.append(helper.make_node("Relu", ["logits"], ["out"], name="relu_out"))
    m.graph.output[0].name = "out"
    with pytest.raises(ConfigError, match=re.escape("'out' is made by 'relu_out' (Relu), not by a Gemm")):
        find_head(m)
    m = _mlp()
    w2 = next(t for t in m.graph.initializer if t.name == "w2")
    m.graph.initializer.remove(w2)
    m.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [3, 5]))
    with pytest.raises(ConfigError, match="head weight 'w2' of node 'fc2' \\(Gemm\\) is not an initializer"):
        find_head(m)


def test_with_head_replaces_exactly_the_head_initializers():
    m = _mlp()
    head = find_head(m)
    w = head_weights(m, head)
    new = {k: v + 1 for k, v in w.items()}
    out = with_head(m, new)
    assert list(out.graph.node) == list(m.graph.node)
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    was = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert {n for n in got if not np.array_equal(got[n], was[n])} == {"w2", "b2"}
    assert np.array_equal(got["w2"], new["w2"]) and np.array_equal(head_weights(m, head)["w2"], w["w2"])
    with pytest.raises(ConfigError, match=r"new 'w2' is float32\[5, 3\], the model's is float32\[3, 5\]"):
        with_head(m, {"w2": w["w2"].T.copy()})
    with pytest.raises(ConfigError, match="no initializer 'nope'"):
        with_head(m, {"nope": w["w2"]})


# ------------------------------------------------------------------- a node's split and the wire form


def test_local_split_is_deterministic_and_disjoint():
    tr, te = local_split(100)
    assert len(te) == 25 and len(tr) == 75 and not set(tr) & set(te) and set(tr) | set(te) == set(range(100))
    assert all(np.array_equal(a, b) for a, b in zip((tr, te), local_split(100), strict=True))
    assert [len(p) for p in local_split(2)] == [1, 1] and [len(p) for p in local_split(3)] == [2, 1]
    with pytest.raises(ConfigError, match="at least 2 labelled samples"):
        local_split(1)


def test_head_weights_round_trip_the_wire_and_are_checked():
    w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    expect = {"w": ((2, 3), "float32"), "b": ((2,), "float32")}
    back = head_from_wire(head_to_wire(w), expect)
    assert all(np.array_equal(back[k], w[k]) and back[k].dtype == w[k].dtype for k in w)
    wire = head_to_wire(w)
    bad = [
        ({"w": wire["w"]}, "expected \\['b', 'w'\\]"),
        (
            {**wire, "w": {**wire["w"], "dtype": "float64"}},
            "'w' is float64\\[2, 3\\], expected float32\\[2, 3\\]",
        ),
        ({**wire, "w": {**wire["w"], "data": b"\0" * 8}}, "'w' holds 8 bytes"),
        ({**wire, "b": {**wire["b"], "data": np.full(2, np.nan, np.float32).tobytes()}}, "non-finite"),
    ]
    for body, words in bad:
        with pytest.raises(ConfigError, match=words):
            head_from_wire(body, expect)
