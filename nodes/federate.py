"""The node side of federated personalisation: fine-tune the head on this node's own data.

A node started with ``--data FILE.npz`` (arrays ``x`` [N, features…] float32 and ``y`` [N] integer
labels) splits it deterministically into a train and a test part (``scheduler.fedavg.local_split``)
and answers the ``federate`` control op:

``{"action": "info"}``
    ``{"data": bool, "train_samples", "test_samples"}`` — whether this node holds data at all.
``{"action": "round", "package", "head": {"node", "weight", "bias"}, "weights", "epochs", "lr", "seed"}``
    Cut the body (graph input → the head's input) from the package's model, which the node must already
    hold in its verified store; compute the features of its samples with onnxruntime (kept for the
    next rounds); measure the received global head on the test part; fine-tune it on the train part
    (``finetune_head``, in a worker thread); measure again.  Replies ``{"weights": <head_to_wire>,
    "train_samples", "test_samples", "before", "after"}`` — only head weights and counts, never data.
``{"action": "evaluate", "package", "head", "weights"}``
    ``{"accuracy", "test_samples"}`` of the given head on the test part.

Every refusal (no data, package not held, head names that are not the package's head, weights whose
names, shapes or dtypes do not match) is a ``ControlReply(ok=False)`` whose ``error`` says what was wrong.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meshai.errors import ConfigError, MeshaiError
from meshai.protocol import ControlReply
from scheduler.fedavg import finetune_head, head_accuracy, head_from_wire, head_to_wire, local_split

if TYPE_CHECKING:
    import onnx

    from nodes.agent import NodeAgent
    from scheduler.graph import GraphIR
    from scheduler.head import Head

__all__ = ["NodeData", "head_features", "load_node_data", "on_federate"]

OP = "federate"
#: Samples per onnxruntime call when the body's batch dimension is free.
CHUNK = 256
MAX_EPOCHS = 1000


@dataclass(frozen=True)
class NodeData:
    """A node's labelled samples and its deterministic train/test split (indices)."""

    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    test: np.ndarray


def load_node_data(path: str | Path) -> NodeData:
    """Read ``--data FILE.npz`` (``x`` float32 [N, …], ``y`` integer [N]) and split it; ConfigError."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--data {str(p)!r} is not a readable .npz file: {exc}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ConfigError(
            f"--data {str(p)!r} lacks array {missing[0]!r} (it has {', '.join(sorted(arrays)) or 'none'}; "
            "expected x [N, features…] float32 and y [N] integer labels)"
        )
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.float32 or x.ndim < 2:
        raise ConfigError(
            f"--data {str(p)!r}: x must be float32 [N, features…], got {x.dtype}{list(x.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise ConfigError(
            f"--data {str(p)!r}: y must be {x.shape[0]} integer labels (one per row of x), got {y.dtype}{list(y.shape)}"
        )
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"--data {str(p)!r}: x holds non-finite values")
    if y.size and int(y.min()) < 0:
        raise ConfigError(f"--data {str(p)!r}: labels must be >= 0, got {int(y.min())}")
    train, test = local_split(int(x.shape[0]))
    return NodeData(x, y.astype(np.int64), train, test)


def head_features(
    model: onnx.ModelProto,
    graph: GraphIR,
    head: Head,
    x: np.ndarray,
    providers: tuple[str, ...] | None = None,
    threads: int = 1,
) -> np.ndarray:
    """The head's input for every sample of ``x`` ([N, …] float32): the body — graph input to
    ``head.features``, cut from the normalized ``model`` — run by onnxruntime; returns [N, in] float32."""
    from nodes.executor import StageSession
    from scheduler.extract import extract_cut

    if len(graph.inputs) != 1:
        raise ConfigError(f"federated fine-tuning needs a model with one input; it has {list(graph.inputs)}")
    if head.features == graph.inputs[0]:
        return np.asarray(x, np.float32).reshape(x.shape[0], -1)
    body = extract_cut(model, graph, graph.inputs, [head.features], "federate_body")
    sess = StageSession(body, providers, threads, "the model's body (input to head)")
    name = sess.input_names[0]
    shape = sess.input_shapes[name]
    fixed = shape[0] if shape and isinstance(shape[0], int) else None
    step = fixed or CHUNK
    parts: list[np.ndarray] = []
    for start in range(0, x.shape[0], step):
        chunk = x[start : start + step]
        n = chunk.shape[0]
        if fixed is not None and n < fixed:  # a fixed batch dimension: pad the last chunk
            chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
        out = sess.run({name: chunk})[head.features]
        parts.append(np.asarray(out, np.float32).reshape(out.shape[0], -1)[:n])
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


@dataclass
class _State:
    """What a node keeps between rounds: its data and the features of the last body it ran."""

    data: NodeData | None = None
    features: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


_STATES: weakref.WeakKeyDictionary[NodeAgent, _State] = weakref.WeakKeyDictionary()


def _str(body: Mapping[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise ConfigError(f"federate needs {key!r} as a non-empty string, got {v!r}")
    return v


def _int(body: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"federate {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(body: Mapping[str, Any], key: str, default: float) -> float:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"federate {key!r} must be a number, got {v!r}")
    return float(v)


def _head_of(agent: NodeAgent, body: Mapping[str, Any]) -> tuple[str, Any, Any, Head]:
    """(package ref, normalized model, graph, head) for the body's package and head names; ConfigError
    unless the package's model has exactly that head."""
    from scheduler.head import find_head

    ref = _str(body, "package")
    spec = body.get("head")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"federate needs 'head' as {{node, weight, bias}}, got {spec!r}")
    node = _str(spec, "node")
    model, graph, _cal = agent.package_graph(ref)
    head = find_head(model, node)
    if (head.weight, head.bias) != (spec.get("weight"), spec.get("bias")):
        raise ConfigError(
            f"head node {node!r} of {ref} reads weight {head.weight!r} and bias {head.bias!r}, "
            f"not {spec.get('weight')!r} and {spec.get('bias')!r}"
        )
    return ref, model, graph, head


def _prepare(
    agent: NodeAgent, state: _State, data: NodeData, body: Mapping[str, Any]
) -> tuple[Head, dict[str, np.ndarray], np.ndarray]:
    """Blocking part of a request (worker thread): the head, the received weights (checked against
    the model's), and the features of this node's samples."""
    from scheduler.head import head_weights

    ref, model, graph, head = _head_of(agent, body)
    current = head_weights(model, head)
    weights = head_from_wire(
        body.get("weights"), {n: (tuple(a.shape), a.dtype.name) for n, a in current.items()}
    )
    key = (ref, head.features)
    feats = state.features.get(key)
    if feats is None:
        feats = head_features(model, graph, head, data.x, agent.config.providers, agent.config.threads)
        state.features = {key: feats}  # one body's features at a time
    return head, weights, feats


def _round(agent: NodeAgent, state: _State, data: NodeData, body: Mapping[str, Any]) -> dict[str, Any]:
    head, weights, feats = _prepare(agent, state, data, body)
    epochs = _int(body, "epochs", 1, 0, MAX_EPOCHS)
    seed = _int(body, "seed", 0, 0, 2**63 - 1)
    batch = _int(body, "batch_size", 32, 1, 1 << 20)
    lr = _float(body, "lr", 0.1)
    kw: dict[str, Any] = {"names": head.names, "trans_b": head.trans_b}
    tr, te = data.train, data.test
    before = head_accuracy(weights, feats[te], data.y[te], **kw)
    new = finetune_head(
        weights, feats[tr], data.y[tr], epochs=epochs, lr=lr, seed=seed, batch_size=batch, **kw
    )
    after = head_accuracy(new, feats[te], data.y[te], **kw)
    return {
        "weights": head_to_wire(new),
        "train_samples": len(tr),
        "test_samples": len(te),
        "before": before,
        "after": after,
    }


def _evaluate(agent: NodeAgent, state: _State, data: NodeData, body: Mapping[str, Any]) -> dict[str, Any]:
    head, weights, feats = _prepare(agent, state, data, body)
    te = data.test
    acc = head_accuracy(weights, feats[te], data.y[te], names=head.names, trans_b=head.trans_b)
    return {"accuracy": acc, "test_samples": len(te)}


async def on_federate(agent: NodeAgent, body: Mapping[str, Any]) -> ControlReply:
    """Answer one ``federate`` control request (see the module docstring)."""
    state = _STATES.setdefault(agent, _State())
    try:
        action = body.get("action")
        path = agent.config.data
        if action == "info" and not path:
            return ControlReply(OP, True, {"data": False})
        if not path:
            raise ConfigError(f"node {agent.name!r} holds no data (start it with --data FILE.npz)")
        if state.data is None:
            state.data = await asyncio.to_thread(load_node_data, path)
        data = state.data
        if action == "info":
            return ControlReply(
                OP, True, {"data": True, "train_samples": len(data.train), "test_samples": len(data.test)}
            )
        if action == "round":
            return ControlReply(OP, True, await asyncio.to_thread(_round, agent, state, data, body))
        if action == "evaluate":
            return ControlReply(OP, True, await asyncio.to_thread(_evaluate, agent, state, data, body))
        raise ConfigError(f"unknown federate action {action!r} (info, round, evaluate)")
    except MeshaiError as exc:
        return ControlReply(OP, False, {"error": f"node {agent.name!r}: {exc}"})
