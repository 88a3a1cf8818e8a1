"""Federated personalisation of a model's head: local fine-tuning and federated averaging, in numpy.

Each site fine-tunes only the head (the last Gemm layer: weight ``W`` and bias ``b``) on its own
labelled data, where the features are the *inputs* of that layer (what the rest of the model computes
on the node).  ``finetune_head`` returns only the updated head weights, never data; ``fedavg`` averages
the sites' head weights by their sample counts (McMahan et al., 2017).  Both are pure: no I/O, no
clock, and the same seed gives the same weights.

A round of FedAvg, as the coordinator runs it::

    updates = [(finetune_head(global_head, x_i, y_i, names=names, seed=r), len(y_i)) for each node i]
    global_head = fedavg(updates)

The head's layout is the ONNX Gemm's: with ``trans_b=True`` (the default, as in ``meshai.digits``)
``W`` is [classes, features] and logits = x @ W.T + b; with ``trans_b=False`` it is [features, classes]
and logits = x @ W + b.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from meshai.errors import ConfigError

__all__ = [
    "TEST_FRACTION",
    "fedavg",
    "finetune_head",
    "head_accuracy",
    "head_from_wire",
    "head_logits",
    "head_to_wire",
    "local_split",
]

#: Share of a node's labelled samples it keeps for measuring accuracy (never trained on).
TEST_FRACTION = 0.25


def fedavg(updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """The sample-count-weighted mean of the nodes' weights: sum(n_i * w_i) / sum(n_i) per tensor.

    Every update must hold the same tensor names with the same shapes and (floating) dtypes; the result
    keeps each tensor's dtype (the mean is taken in float64).  Nodes with 0 samples count for nothing;
    a total of 0 samples, an empty list, or any mismatch raises ConfigError naming the tensor."""
    if not updates:
        raise ConfigError("fedavg needs at least one update, got none")
    counts: list[int] = []
    for i, (_, n) in enumerate(updates):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ConfigError(f"update {i}: sample count must be an integer >= 0, got {n!r}")
        counts.append(int(n))
    total = sum(counts)
    if total == 0:
        raise ConfigError(f"fedavg over {len(updates)} update(s) with 0 samples in total: nothing to average")
    first = updates[0][0]
    names = sorted(first)
    if not names:
        raise ConfigError("update 0 holds no tensors")
    ref: dict[str, np.ndarray] = {}
    for name in names:
        t = np.asarray(first[name])
        if not np.issubdtype(t.dtype, np.floating):
            raise ConfigError(f"tensor {name!r} has dtype {t.dtype}; only floating tensors can be averaged")
        ref[name] = t
    for i, (weights, _) in enumerate(updates[1:], start=1):
        keys = set(weights)
        if keys != set(names):
            missing = sorted(set(names) - keys)
            extra = sorted(keys - set(names))
            what = "; ".join(
                p
                for p in (
                    f"lacks tensor(s) {', '.join(map(repr, missing))}" if missing else "",
                    f"has unexpected tensor(s) {', '.join(map(repr, extra))}" if extra else "",
                )
                if p
            )
            raise ConfigError(f"update {i} {what} (update 0 holds {', '.join(map(repr, names))})")
        for name in names:
            t = np.asarray(weights[name])
            if t.shape != ref[name].shape:
                raise ConfigError(
                    f"tensor {name!r} has shape {t.shape} in update {i} but {ref[name].shape} in update 0"
                )
            if t.dtype != ref[name].dtype:
                raise ConfigError(
                    f"tensor {name!r} has dtype {t.dtype} in update {i} but {ref[name].dtype} in update 0"
                )
    out: dict[str, np.ndarray] = {}
    for name in names:
        acc = np.zeros(ref[name].shape, np.float64)
        for (weights, _), n in zip(updates, counts, strict=True):
            if n:
                acc += n * np.asarray(weights[name], np.float64)
        mean = acc / total
        if not np.all(np.isfinite(mean)):
            raise ConfigError(f"tensor {name!r} averages to non-finite values")
        out[name] = mean.astype(ref[name].dtype)
    return out


# ------------------------------------------------------------------------------------ the head layer


def _head(
    weights: Mapping[str, np.ndarray], names: tuple[str, str], trans_b: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(W as [classes, features] float64, b [classes] float64), checked."""
    if not (isinstance(names, tuple) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"names must be a (weight, bias) pair of tensor names, got {names!r}")
    wn, bn = names
    for n in names:
        if n not in weights:
            raise ConfigError(f"head tensor {n!r} is not among the weights ({', '.join(map(repr, weights))})")
    w = np.asarray(weights[wn])
    b = np.asarray(weights[bn])
    if w.ndim != 2:
        raise ConfigError(f"head weight {wn!r} must be 2-D, got shape {w.shape}")
    w = w.T if not trans_b else w
    if b.shape != (w.shape[0],):
        raise ConfigError(f"head bias {bn!r} must have shape ({w.shape[0]},), got {b.shape}")
    for n, t in ((wn, w), (bn, b)):
        if not np.issubdtype(t.dtype, np.floating):
            raise ConfigError(f"head tensor {n!r} has dtype {t.dtype}; it must be floating")
        if not np.all(np.isfinite(t)):
            raise ConfigError(f"head tensor {n!r} holds non-finite values")
    return w.astype(np.float64), b.astype(np.float64)


def _data(features: np.ndarray, labels: np.ndarray | None, n_in: int, n_out: int) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ConfigError(f"features must have shape (N, {n_in}) to match the head, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("features hold non-finite values")
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (x.shape[0],):
            raise ConfigError(f"labels must have shape ({x.shape[0]},) to match the features, got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= n_out):
            bad = int(y[(y < 0) | (y >= n_out)][0])
            raise ConfigError(f"label {bad} is outside the head's {n_out} classes [0, {n_out - 1}]")
    return x.astype(np.float64)


def head_logits(
    weights: Mapping[str, np.ndarray], features: np.ndarray, *, names: tuple[str, str], trans_b: bool = True
) -> np.ndarray:
    """The head's logits [N, classes] (float64) on ``features`` [N, in]."""
    w, b = _head(weights, names, trans_b)
    x = _data(features, None, w.shape[1], w.shape[0])
    out: np.ndarray = x @ w.T + b
    return out


def head_accuracy(
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    *,
    names: tuple[str, str],
    trans_b: bool = True,
) -> float:
    """Share (0..1) of ``labels`` the head predicts (argmax of logits) on ``features``."""
    w, b = _head(weights, names, trans_b)
    x = _data(features, labels, w.shape[1], w.shape[0])
    if x.shape[0] == 0:
        raise ConfigError("accuracy of an empty set of samples is undefined")
    return float(np.mean(np.argmax(x @ w.T + b, axis=1) == np.asarray(labels)))


def finetune_head(
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    *,
    names: tuple[str, str],
    epochs: int = 5,
    lr: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    trans_b: bool = True,
) -> dict[str, np.ndarray]:
    """Fine-tune the head ``names = (weight, bias)`` on the node's ``features`` (the head layer's
    inputs, [N, in]) and integer ``labels`` [N] by softmax regression: plain minibatch gradient descent
    on the mean cross-entropy (+ ``weight_decay`` / 2 · ||W||² if set), ``epochs`` passes over the data
    in an order drawn from ``seed``.  Returns only the two updated head tensors, with their original
    shapes and dtypes — never any data."""
    w, b = _head(weights, names, trans_b)
    x = _data(features, labels, w.shape[1], w.shape[0])
    y = np.asarray(labels)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"epochs must be an integer >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for pname, v in (("lr", lr), ("weight_decay", weight_decay)):
        f = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
        if not (math.isfinite(f) and f >= 0 and (pname != "lr" or f > 0)):
            raise ConfigError(
                f"{pname} must be a finite number {'>' if pname == 'lr' else '>='} 0, got {v!r}"
            )
    if x.shape[0] == 0 and epochs:
        raise ConfigError("finetune_head needs at least one labelled sample")
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(x.shape[0])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            z = x[idx] @ w.T + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1.0
            g = p / len(idx)
            grad_w = g.T @ x[idx] + weight_decay * w
            grad_b = g.sum(axis=0)
            w = w - lr * grad_w
            b = b - lr * grad_b
    wn, bn = names
    w_out = w if trans_b else w.T
    return {
        wn: np.ascontiguousarray(w_out).astype(np.asarray(weights[wn]).dtype),
        bn: b.astype(np.asarray(weights[bn]).dtype),
    }


# ---------------------------------------------------------------------------- a node's data, the wire


def local_split(n: int, test_fraction: float = TEST_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A node's deterministic split of its ``n`` samples: (train indices, test indices), sorted; the
    test part is ``round(n * test_fraction)`` samples, at least 1, and leaves at least 1 to train on."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"a node needs at least 2 labelled samples (1 to train, 1 to test), got {n!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def head_to_wire(weights: Mapping[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """Head tensors as msgpack-native data (a control body): name -> {data: bytes, dtype, shape}."""
    out: dict[str, dict[str, object]] = {}
    for name, value in weights.items():
        a = np.ascontiguousarray(value)
        out[name] = {"data": a.tobytes(), "dtype": a.dtype.name, "shape": list(a.shape)}
    return out


def head_from_wire(body: object, expect: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """Head tensors from ``head_to_wire``'s form, checked against ``expect`` (name -> (shape, dtype)):
    exactly those names, each with that shape and dtype and finite values; ConfigError names the tensor."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"head weights must be a map of tensor name to tensor, got {type(body).__name__}")
    if set(body) != set(expect):
        raise ConfigError(f"head weights name {sorted(map(str, body))}, expected {sorted(expect)}")
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in expect.items():
        t = body[name]
        if not isinstance(t, Mapping) or not isinstance(t.get("data"), bytes):
            raise ConfigError(f"head tensor {name!r} must be {{data: bytes, dtype, shape}}")
        if t.get("dtype") != dtype or list(t.get("shape", ())) != list(shape):
            raise ConfigError(
                f"head tensor {name!r} is {t.get('dtype')}{list(t.get('shape', ()))}, expected {dtype}{list(shape)}"
            )
        data = t["data"]
        if len(data) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ConfigError(f"head tensor {name!r} holds {len(data)} bytes, not {dtype}{list(shape)}")
        a = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        if not np.all(np.isfinite(a)):
            raise ConfigError(f"head tensor {name!r} holds non-finite values")
        out[name] = a
    return out
