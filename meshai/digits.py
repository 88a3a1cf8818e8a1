"""A real accuracy case shipped with meshai: an MLP trained on scikit-learn's bundled digits.

``train_digits(out_dir)`` trains a 64→256→128→10 MLP with numpy (Adam, cross-entropy, a fixed seed;
about a second on 2 cores), writes it as ``digits.onnx`` (input ``pixels`` float32 [N,64], output
``logits`` float32 [N,10], real initializers) and writes its data in the tensor file layout of
ARCHITECTURE.md: ``calibration.npz`` and ``eval.npz`` hold ``pixels`` of shape (S, 1, 64) — one
request of batch 1 per sample — and ``labels.npz`` holds ``labels`` (S,) for the eval samples.
Nothing is downloaded: the 1797 8×8 images ship inside scikit-learn (the ``[dev]`` extra).
The same seed gives the same files.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from meshai.errors import ConfigError
from meshai.tensors import save_npz

__all__ = ["DigitsCase", "FederatedDigits", "digits_model", "federated_digits", "train_digits"]

INPUT = "pixels"
OUTPUT = "logits"
OPSET = 17
#: Share of the 1797 images held out for evaluation; the rest trains, and calibration samples come
#: from the training part (never from the held-out split).
EVAL_FRACTION = 0.3
CALIBRATION_SAMPLES = 200


@dataclass(frozen=True)
class DigitsCase:
    """Paths of one trained digits case and the fp32 model's accuracy (%) on the held-out split."""

    model: Path
    calibration: Path
    eval: Path
    labels: Path
    fp32_accuracy: float
    eval_samples: int
    calibration_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "calibration": str(self.calibration),
            "eval": str(self.eval),
            "labels": str(self.labels),
            "fp32_accuracy": self.fp32_accuracy,
            "eval_samples": self.eval_samples,
            "calibration_samples": self.calibration_samples,
        }


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Pixels scaled to [0, 1] (float32, [1797, 64]) and labels (int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "the digits case needs scikit-learn: pip install 'meshai[examples]' (or 'meshai[dev]')"
        ) from None
    x, y = load_digits(return_X_y=True)
    return (np.asarray(x, np.float32) / 16.0), np.asarray(y, np.int64)


def _init(rng: np.random.Generator, sizes: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised (W [out, in], b [out]) per layer."""
    return [
        (rng.standard_normal((o, i)) * np.sqrt(2.0 / i), np.zeros(o)) for i, o in itertools.pairwise(sizes)
    ]


def _forward(params: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> list[np.ndarray]:
    """Activations of every layer (input first, logits last)."""
    acts = [x]
    for k, (w, b) in enumerate(params):
        z = acts[-1] @ w.T + b
        acts.append(np.maximum(z, 0.0) if k < len(params) - 1 else z)
    return acts


def _train(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, hidden: tuple[int, ...], epochs: int = 40
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mini-batch Adam on softmax cross-entropy (float64 for reproducibility across BLAS builds)."""
    params = _init(rng, (x.shape[1], *hidden, 10))
    flat = [p for wb in params for p in wb]
    m = [np.zeros_like(p) for p in flat]
    v = [np.zeros_like(p) for p in flat]
    lr, b1, b2, eps, decay, batch = 1e-3, 0.9, 0.999, 1e-8, 1e-4, 32
    x64 = x.astype(np.float64)
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x64))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            acts = _forward(params, x64[idx])
            logits = acts[-1]
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            delta = p / len(idx)
            grads: list[np.ndarray] = []
            for k in range(len(params) - 1, -1, -1):
                w, _ = params[k]
                grads[:0] = [delta.T @ acts[k] + decay * w, delta.sum(axis=0)]
                if k:
                    delta = (delta @ w) * (acts[k] > 0)
            step += 1
            for j, g in enumerate(grads):
                m[j] = b1 * m[j] + (1 - b1) * g
                v[j] = b2 * v[j] + (1 - b2) * g * g
                mh = m[j] / (1 - b1**step)
                vh = v[j] / (1 - b2**step)
                flat[j] -= lr * mh / (np.sqrt(vh) + eps)
    return [(flat[2 * k], flat[2 * k + 1]) for k in range(len(params))]


def digits_model(params: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """The MLP as ONNX: Gemm(transB)+Relu per hidden layer, a final Gemm to ``logits``."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = INPUT
    for k, (w, b) in enumerate(params):
        last = k == len(params) - 1
        wn, bn = f"fc{k + 1}.weight", f"fc{k + 1}.bias"
        inits += [
            numpy_helper.from_array(w.astype(np.float32), wn),
            numpy_helper.from_array(b.astype(np.float32), bn),
        ]
        out = OUTPUT if last else f"fc{k + 1}"
        nodes.append(helper.make_node("Gemm", [cur, wn, bn], [out], name=f"fc{k + 1}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{k + 1}"], name=f"relu{k + 1}"))
            out = f"relu{k + 1}"
        cur = out
    n_in = params[0][0].shape[1]
    n_out = params[-1][0].shape[0]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshai")
    onnx.checker.check_model(model)
    return model


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, calibration (a subset of train) and held-out eval samples."""
    order = rng.permutation(n)
    n_eval = round(n * EVAL_FRACTION)
    ev, train = np.sort(order[:n_eval]), order[n_eval:]
    cal = np.sort(rng.choice(train, size=min(CALIBRATION_SAMPLES, len(train)), replace=False))
    return np.sort(train), cal, ev


def _start(out_dir: str | Path, seed: int) -> tuple[Path, np.ndarray, np.ndarray, np.random.Generator]:
    """``out_dir`` (created), the digits and the seeded generator every case starts from."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {str(out)!r}: {exc.strerror}") from None
    x, y = _load_digits()
    return out, x, y, np.random.default_rng(seed)


def train_digits(out_dir: str | Path, seed: int = 0, hidden: tuple[int, ...] = (256, 128)) -> DigitsCase:
    """Train the digits MLP with ``seed`` and write ``digits.onnx``, ``calibration.npz``, ``eval.npz``
    and ``labels.npz`` into ``out_dir`` (created if missing)."""
    if not hidden or any(h < 1 for h in hidden):
        raise ConfigError(f"hidden layer sizes must be positive, got {hidden}")
    out, x, y, rng = _start(out_dir, seed)
    train, cal, ev = _split(len(x), rng)
    params = _train(x[train], y[train], rng, tuple(hidden))
    model = digits_model(params)
    logits = _forward([(w.astype(np.float32), b.astype(np.float32)) for w, b in params], x[ev])[-1]
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y[ev]) * 100.0)
    case = DigitsCase(
        model=out / "digits.onnx",
        calibration=out / "calibration.npz",
        eval=out / "eval.npz",
        labels=out / "labels.npz",
        fp32_accuracy=round(accuracy, 4),
        eval_samples=len(ev),
        calibration_samples=len(cal),
    )
    try:
        onnx.save(model, str(case.model))
    except OSError as exc:
        raise ConfigError(f"cannot write {str(case.model)!r}: {exc.strerror}") from None
    save_npz(case.calibration, {INPUT: x[cal][:, None, :]})
    save_npz(case.eval, {INPUT: x[ev][:, None, :]})
    save_npz(case.labels, {"labels": y[ev]})
    return case


# ------------------------------------------------------------------ non-IID data for federated learning

#: Share of the images held out as the global test set of ``federated_digits``.
HOLDOUT_FRACTION = 0.2
#: Images per class the base model trains on, and per *rare* class (the last class of each node's group).
BASE_PER_CLASS, BASE_PER_RARE_CLASS = 20, 3
#: Probability that a node's image is of one of its own classes (the rest are spread over the others).
OWN_CLASS_SHARE = 0.85


@dataclass(frozen=True)
class FederatedDigits:
    """Files of the federated digits case: a base model, one ``.npz`` (``x``, ``y``) per node and the
    global held-out set, with the base model's held-out accuracy (%) and each node's class counts."""

    model: Path
    nodes: tuple[Path, ...]
    holdout: Path
    base_accuracy: float
    base_samples: int
    node_classes: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "nodes": [
                {"data": str(p), "samples": sum(c), "class_counts": list(c)}
                for p, c in zip(self.nodes, self.node_classes, strict=True)
            ],
            "holdout": str(self.holdout),
            "base_accuracy": self.base_accuracy,
            "base_samples": self.base_samples,
        }


def federated_digits(out_dir: str | Path, nodes: int, seed: int = 0) -> FederatedDigits:
    """Write a personalisation case with label-skewed (non-IID) data per node into ``out_dir``.

    The classes are dealt out to ``nodes`` groups; node i holds mostly its group's classes
    (``OWN_CLASS_SHARE``).  ``digits.onnx`` is a *base* model trained on a small, skewed subset —
    ``BASE_PER_CLASS`` images per class but only ``BASE_PER_RARE_CLASS`` of the last class of each
    group — so that every node has classes the base head handles badly.  ``node{i}.npz`` holds the
    node's ``x`` (float32 [N, 64]) and ``y`` (int64 [N]); ``holdout.npz`` the global held-out set.
    The base images, the held-out images and the nodes' images are disjoint."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 10:
        raise ConfigError(f"--federated needs 1 to 10 nodes (one class group each), got {nodes!r}")
    out, x, y, rng = _start(out_dir, seed)
    order = rng.permutation(len(x))
    n_hold = round(len(x) * HOLDOUT_FRACTION)
    hold, rest = np.sort(order[:n_hold]), order[n_hold:]
    groups = np.array_split(np.arange(10), nodes)
    rare = {int(g[-1]) for g in groups}
    base = np.concatenate(
        [rest[y[rest] == c][: BASE_PER_RARE_CLASS if c in rare else BASE_PER_CLASS] for c in range(10)]
    )
    pool = rng.permutation(np.setdiff1d(rest, base))
    owner = {int(c): i for i, g in enumerate(groups) for c in g}
    parts: list[list[int]] = [[] for _ in range(nodes)]
    for j in pool:
        i = owner[int(y[j])]
        if nodes > 1 and rng.random() >= OWN_CLASS_SHARE:
            i = int(rng.choice([k for k in range(nodes) if k != i]))
        parts[i].append(int(j))
    params = _train(x[base], y[base], rng, (256, 128), epochs=15)
    logits = _forward([(w.astype(np.float32), b.astype(np.float32)) for w, b in params], x[hold])[-1]
    case = FederatedDigits(
        model=out / "digits.onnx",
        nodes=tuple(out / f"node{i}.npz" for i in range(nodes)),
        holdout=out / "holdout.npz",
        base_accuracy=round(float(np.mean(np.argmax(logits, axis=1) == y[hold]) * 100.0), 4),
        base_samples=len(base),
        node_classes=tuple(tuple(int(c) for c in np.bincount(y[p], minlength=10)) for p in parts),
    )
    try:
        onnx.save(digits_model(params), str(case.model))
    except OSError as exc:
        raise ConfigError(f"cannot write {str(case.model)!r}: {exc.strerror}") from None
    for path, p in zip(case.nodes, parts, strict=True):
        idx = np.sort(np.array(p, dtype=np.int64))
        save_npz(path, {"x": x[idx], "y": y[idx]})
    save_npz(case.holdout, {"x": x[hold], "y": y[hold]})
    return case
