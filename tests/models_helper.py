"""Small ONNX models built with ``onnx.helper`` (opset 17, IR 8) for partitioning tests.

Each builder returns a fresh, checked ``ModelProto`` with deterministic weights.  ``CASES`` maps a
short name to its builder.  Import it as ``from models_helper import CASES`` (pytest puts ``tests/``
on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

__all__ = [
    "CASES",
    "branchy_model",
    "dynamic_batch_model",
    "if_model",
    "multi_io_model",
    "shape_model",
    "skip_model",
]


def _weight(name: str, shape: Sequence[int], seed: int, scale: float = 0.3) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _int64(name: str, values: Sequence[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshai-tests")
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m)
    return m


def _vi(name: str, shape: Sequence[int | str] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def skip_model() -> onnx.ModelProto:
    """Conv/Relu chain with skip connections: an Add joins a tensor from 3 ops back, twice.

    A ``Constant`` bias (a weight in disguise) is read by the first and the last Add, so any cut
    between them needs it on both sides.
    """
    c = 4
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["bias"],
            name="bias_const",
            value=numpy_helper.from_array(np.full((1, c, 1, 1), 0.1, np.float32)),
        ),
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Add", ["r0", "bias"], ["b0"], name="bias0"),
        helper.make_node("Conv", ["b0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "b0"], ["s0"], name="skip0"),  # b0 is 3 ops back
        helper.make_node("Relu", ["s0"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4"], ["c4"], name="conv4", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c4", "r2"], ["s1"], name="skip1"),  # r2 is 3 ops back
        helper.make_node("Add", ["s1", "bias"], ["y"], name="bias1"),
    ]
    inits = [_weight(f"w{i}", (c, c, 3, 3), seed=i, scale=0.2) for i in range(5)]
    g = helper.make_graph(nodes, "skip", [_vi("x", [1, c, 8, 8])], [_vi("y", [1, c, 8, 8])], inits)
    return _model(g)


def multi_io_model() -> onnx.ModelProto:
    """Two inputs, three outputs; output ``h`` is also consumed further on, input ``b`` twice."""
    nodes = [
        helper.make_node("MatMul", ["a", "wa"], ["ma"], name="mm_a"),
        helper.make_node("Add", ["ma", "b"], ["s"], name="add_b"),
        helper.make_node("Relu", ["s"], ["h"], name="relu_h"),  # graph output, and consumed below
        helper.make_node("MatMul", ["h", "wh"], ["mh"], name="mm_h"),
        helper.make_node("Tanh", ["mh"], ["t"], name="tanh"),
        helper.make_node("Sigmoid", ["b"], ["sb"], name="sig_b"),
        helper.make_node("Mul", ["t", "sb"], ["out1"], name="gate"),
        helper.make_node("Add", ["h", "out1"], ["out2"], name="mix"),
    ]
    inits = [_weight("wa", (6, 8), 10), _weight("wh", (8, 8), 11)]
    g = helper.make_graph(
        nodes,
        "multi_io",
        [_vi("a", [2, 6]), _vi("b", [2, 8])],
        [_vi("h", [2, 8]), _vi("out1", [2, 8]), _vi("out2", [2, 8])],
        inits,
    )
    return _model(g)


def shape_model() -> onnx.ModelProto:
    """An int64 ``Shape`` output that is a graph output and feeds a ``Reshape`` further on."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Shape", ["r"], ["shape"], name="shape"),  # int64, graph output
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("MatMul", ["f", "w"], ["m"], name="mm"),
        helper.make_node("Tanh", ["m"], ["t"], name="tanh"),
        helper.make_node("Reshape", ["t", "shape"], ["y"], name="reshape"),
    ]
    g = helper.make_graph(
        nodes,
        "shape",
        [_vi("x", [2, 3, 4])],
        [_vi("y", [2, 3, 4]), _vi("shape", [3], TensorProto.INT64)],
        [_weight("w", (12, 12), 20)],
    )
    return _model(g)


def dynamic_batch_model() -> onnx.ModelProto:
    """Input ``x`` of shape [N, 3, 8, 8]: convs, then a Reshape to [N, -1] whose shape is computed
    from ``Shape(x)`` (int64 activations), then a Gemm head; output [N, 5]."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["p0"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Shape", ["x"], ["xs"], name="shape_x"),
        helper.make_node("Gather", ["xs", "zero"], ["n"], name="batch_dim", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="batch_1d"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="target_shape", axis=0),
        helper.make_node("Reshape", ["r1", "target"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["y"], name="head", transB=1),
    ]
    inits = [
        _weight("w0", (6, 3, 3, 3), 30),
        _weight("b0", (6,), 31),
        _weight("w1", (4, 6, 3, 3), 32),
        _weight("wg", (5, 4 * 4 * 4), 33, scale=0.1),
        _weight("bg", (5,), 34),
        numpy_helper.from_array(np.asarray(0, dtype=np.int64), "zero"),
        _int64("axes0", [0]),
        _int64("minus1", [-1]),
    ]
    g = helper.make_graph(nodes, "dynamic_batch", [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 5])], inits)
    return _model(g)


def if_model() -> onnx.ModelProto:
    """An ``If`` on ``ReduceSum(x) > 0`` whose branches read outer-scope tensors: an activation
    (``r``), an initializer (``w``) and a constant op's output (``scale``)."""
    then_g = helper.make_graph(
        [
            helper.make_node("MatMul", ["r", "w"], ["tm"], name="then_mm"),
            helper.make_node("Add", ["tm", "scale"], ["then_out"], name="then_add"),
        ],
        "then_branch",
        [],
        [_vi("then_out", [1, 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["r", "scale"], ["else_out"], name="else_mul")],
        "else_branch",
        [],
        [_vi("else_out", [1, 4])],
    )
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["scale"],
            name="scale_const",
            value=numpy_helper.from_array(np.full((1, 4), -0.5, np.float32)),
        ),
        helper.make_node("Relu", ["x"], ["r0"], name="relu"),
        helper.make_node("MatMul", ["r0", "w"], ["r"], name="pre_mm"),
        helper.make_node("ReduceSum", ["x"], ["sum"], name="sum", keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["branch"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Tanh", ["branch"], ["t"], name="tanh"),
        helper.make_node("Add", ["t", "r"], ["y"], name="join"),
    ]
    inits = [_weight("w", (4, 4), 40), numpy_helper.from_array(np.asarray(0.0, dtype=np.float32), "zero")]
    g = helper.make_graph(nodes, "if", [_vi("x", [1, 4])], [_vi("y", [1, 4])], inits)
    return _model(g)


def branchy_model() -> onnx.ModelProto:
    """Two camera inputs, each with its own conv branch, fused by a Concat + Gemm head."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for cam in (0, 1):
        x = f"cam{cam}"
        nodes += [
            helper.make_node(
                "Conv", [x, f"cam{cam}_w0"], [f"cam{cam}_c0"], name=f"cam{cam}_conv0", pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", [f"cam{cam}_c0"], [f"cam{cam}_r0"], name=f"cam{cam}_relu0"),
            helper.make_node(
                "Conv",
                [f"cam{cam}_r0", f"cam{cam}_w1"],
                [f"cam{cam}_c1"],
                name=f"cam{cam}_conv1",
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"cam{cam}_c1"], [f"cam{cam}_r1"], name=f"cam{cam}_relu1"),
            helper.make_node("GlobalAveragePool", [f"cam{cam}_r1"], [f"cam{cam}_g"], name=f"cam{cam}_gap"),
        ]
        inits += [
            _weight(f"cam{cam}_w0", (4, 3, 3, 3), 50 + cam),
            _weight(f"cam{cam}_w1", (6, 4, 3, 3), 60 + cam),
        ]
    nodes += [
        helper.make_node("Concat", ["cam0_g", "cam1_g"], ["fused"], name="head_concat", axis=1),
        helper.make_node("Flatten", ["fused"], ["flat"], name="head_flatten", axis=1),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"], name="head_gemm", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="head_softmax", axis=1),
    ]
    inits += [_weight("head_w", (3, 12), 70), _weight("head_b", (3,), 71)]
    g = helper.make_graph(
        nodes,
        "branchy",
        [_vi("cam0", [1, 3, 16, 16]), _vi("cam1", [1, 3, 16, 16])],
        [_vi("logits", [1, 3]), _vi("probs", [1, 3])],
        inits,
    )
    return _model(g)


CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "skip": skip_model,
    "multi_io": multi_io_model,
    "shape": shape_model,
    "dynamic_batch": dynamic_batch_model,
    "if": if_model,
    "branchy": branchy_model,
}
