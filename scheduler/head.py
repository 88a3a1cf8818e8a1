"""The head of an ONNX classifier: the last Gemm (or MatMul + Add) layer feeding the graph output.

Federated personalisation fine-tunes only this layer (``scheduler.fedavg``): its weight and bias are
initializers, and its input — the *features* — is what the rest of the model computes.  ``find_head``
finds it automatically or by node name and says precisely why a model has none; ``head_weights``
reads its initializers and ``with_head`` writes new ones into a copy of the model, touching nothing
else.  Pure: ONNX protos and numpy arrays in, the same out.

Only ops that keep the argmax of the logits may sit between the head and the graph output
(``Softmax``, ``LogSoftmax``, ``Identity``), so that fine-tuning the head's logits by softmax
cross-entropy tunes what the model outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from meshai.errors import ConfigError

__all__ = ["PASS_THROUGH", "Head", "find_head", "head_weights", "with_head"]

#: Ops allowed between the head and the graph output: they keep the logits' argmax.
PASS_THROUGH = frozenset({"Softmax", "LogSoftmax", "Identity"})


@dataclass(frozen=True, slots=True)
class Head:
    """A head layer: its node (the Gemm, or the MatMul of a MatMul + Add), the weight and bias
    initializers, the weight layout (``trans_b``: weight is [classes, features]), the tensor that feeds
    it (``features``) and the graph output it makes."""

    node: str
    weight: str
    bias: str
    trans_b: bool
    features: str
    output: str

    @property
    def names(self) -> tuple[str, str]:
        """``(weight, bias)``, as ``scheduler.fedavg`` takes them."""
        return self.weight, self.bias

    def to_dict(self) -> dict[str, str | bool]:
        return {
            "node": self.node,
            "weight": self.weight,
            "bias": self.bias,
            "trans_b": self.trans_b,
            "features": self.features,
            "output": self.output,
        }


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(onnx.helper.get_attribute_value(a))
    return default


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.name!r} ({node.op_type})"


def _layer(
    node: onnx.NodeProto,
    consumers: Mapping[str, list[onnx.NodeProto]],
    inits: Mapping[str, onnx.TensorProto],
) -> tuple[str, str, bool, str, str]:
    """(weight, bias, trans_b, features, layer output) of a Gemm or MatMul + Add node; ConfigError."""
    if node.op_type == "Gemm":
        if len(node.input) < 3 or not node.input[2]:
            raise ConfigError(f"head node {_describe(node)} has no bias input C")
        if (
            _attr(node, "transA", 0) != 0
            or _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
        ):
            raise ConfigError(f"head node {_describe(node)} must have transA=0, alpha=1 and beta=1")
        features, weight, bias = node.input[0], node.input[1], node.input[2]
        trans_b = _attr(node, "transB", 0) != 0
        out = node.output[0]
    elif node.op_type == "MatMul":
        features, weight = node.input[0], node.input[1]
        trans_b = False
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add":
            raise ConfigError(f"head node {_describe(node)} is not followed by exactly one Add (its bias)")
        add = after[0]
        others = [t for t in add.input if t != node.output[0]]
        if len(others) != 1:
            raise ConfigError(f"head bias Add {_describe(add)} must add one tensor to {node.output[0]!r}")
        bias, out = others[0], add.output[0]
    else:
        raise ConfigError(f"node {_describe(node)} is not a Gemm or MatMul head layer")
    for what, name in (("weight", weight), ("bias", bias)):
        if name not in inits:
            raise ConfigError(f"head {what} {name!r} of node {_describe(node)} is not an initializer")
    w, b = (numpy_helper.to_array(inits[n]) for n in (weight, bias))
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ConfigError(f"head weight {weight!r} must be a 2-D float matrix, got {w.dtype}{list(w.shape)}")
    classes = w.shape[0] if trans_b else w.shape[1]
    if b.shape != (classes,) or not np.issubdtype(b.dtype, np.floating):
        raise ConfigError(
            f"head bias {bias!r} must be a float vector of {classes}, got {b.dtype}{list(b.shape)}"
        )
    return weight, bias, trans_b, features, out


def _output_reached(
    tensor: str, outputs: set[str], consumers: Mapping[str, list[onnx.NodeProto]]
) -> tuple[str | None, str]:
    """The graph output ``tensor`` becomes through pass-through ops only, or (None, what blocks it)."""
    while tensor not in outputs:
        after = consumers.get(tensor, [])
        if len(after) != 1:
            return None, f"{tensor!r} is read by {len(after)} ops" if after else f"{tensor!r} is not read"
        if after[0].op_type not in PASS_THROUGH:
            return None, f"{tensor!r} goes through {_describe(after[0])}"
        tensor = after[0].output[0]
    return tensor, ""


def find_head(model: onnx.ModelProto, name: str | None = None) -> Head:
    """The head of ``model``: the Gemm (or MatMul + Add) node ``name``, or without a name the one
    whose output reaches the model's only graph output (through Softmax/LogSoftmax/Identity at most).
    ConfigError names what is missing or wrong: an unknown node, a node that is no head layer, weights
    that are not initializers, a layer that does not feed the output."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
        for t in n.output:
            producer[t] = n
    outputs = {o.name for o in g.output}
    if name is not None:
        node = next((n for n in g.node if n.name == name), None)
        if node is None:
            layers = [n.name for n in g.node if n.op_type in ("Gemm", "MatMul")]
            raise ConfigError(
                f"model has no node named {name!r} (its Gemm/MatMul nodes: {', '.join(layers) or 'none'})"
            )
        weight, bias, trans_b, features, out = _layer(node, consumers, inits)
        reached, why = _output_reached(out, outputs, consumers)
        if reached is None:
            raise ConfigError(f"head node {_describe(node)} does not feed a graph output: {why}")
        return Head(node.name, weight, bias, trans_b, features, reached)
    if len(g.output) != 1:
        raise ConfigError(f"model has {len(g.output)} outputs; name its head layer (--head NODE)")
    tensor = g.output[0].name
    while True:
        node = producer.get(tensor)
        if node is None:
            raise ConfigError(f"graph output {g.output[0].name!r} is made by no Gemm or MatMul + Add head")
        if node.op_type in PASS_THROUGH:
            tensor = node.input[0]
            continue
        if node.op_type == "Add":
            node = next(
                (producer[t] for t in node.input if t in producer and producer[t].op_type == "MatMul"), node
            )
        if node.op_type not in ("Gemm", "MatMul"):
            raise ConfigError(
                f"graph output {g.output[0].name!r} is made by {_describe(node)}, not by a Gemm or "
                "MatMul + Add head layer (name one with --head NODE)"
            )
        weight, bias, trans_b, features, out = _layer(node, consumers, inits)
        return Head(node.name, weight, bias, trans_b, features, g.output[0].name)


def head_weights(model: onnx.ModelProto, head: Head) -> dict[str, np.ndarray]:
    """The head's weight and bias as numpy arrays (copies), by initializer name."""
    inits = {t.name: t for t in model.graph.initializer}
    missing = [n for n in head.names if n not in inits]
    if missing:
        raise ConfigError(f"model has no initializer {missing[0]!r} (head {head.node!r})")
    return {n: numpy_helper.to_array(inits[n]).copy() for n in head.names}


def with_head(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``weights`` hold the new values (same name,
    dtype and shape, else ConfigError); every other byte of the model is left as it was."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for name, value in weights.items():
        old = inits.get(name)
        if old is None:
            raise ConfigError(f"model has no initializer {name!r} to replace")
        arr = np.asarray(value)
        ref = numpy_helper.to_array(old)
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise ConfigError(
                f"new {name!r} is {arr.dtype}{list(arr.shape)}, the model's is {ref.dtype}{list(ref.shape)}"
            )
        old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    return out
