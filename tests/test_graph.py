"""GraphIR: FLOPs pinned against hand-computed values, constant folding, normalization."""

from __future__ import annotations

import onnx
import pytest
from models_helper import CASES
from onnx import TensorProto, helper

from meshai.errors import ModelError
from meshai.models import LIGHT_MODELS, load_model
from scheduler.graph import build_graph, normalize_model


def _single(node: onnx.NodeProto, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph([node], "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _w(name, shape):
    import numpy as np

    return onnx.numpy_helper.from_array(np.zeros(shape, np.float32), name)


def test_conv_flops_hand_computed():
    # N=1, Cin=3, 32x32, Cout=8, 3x3, stride 1, pad 1 -> out 1x8x32x32; MACs = 8*32*32*3*3*3
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="c")
    m = _single(
        node,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_w("w", (8, 3, 3, 3)), _w("b", (8,))],
    )
    g = build_graph(normalize_model(m))
    macs = 8 * 32 * 32 * 3 * 3 * 3
    assert g.ops[0].flops == 2 * macs + 8 * 32 * 32
    assert g.param_bytes == (8 * 3 * 3 * 3 + 8) * 4


def test_grouped_conv_flops():
    # depthwise: group=4, Cin=4, Cout=4, weight (4,1,3,3), stride 2, 16x16 -> 8x8
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2], group=4)
    m = _single(
        node,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_w("w", (4, 1, 3, 3))],
    )
    g = build_graph(normalize_model(m))
    assert g.ops[0].flops == 2 * (2 * 4 * 8 * 8) * 1 * 9


def test_gemm_flops_hand_computed():
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], transB=1)
    m = _single(
        node,
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_w("w", (10, 64)), _w("c", (10,))],
    )
    g = build_graph(normalize_model(m))
    assert g.ops[0].flops == 2 * 5 * 10 * 64 + 5 * 10


def test_matmul_flops_batched_and_symbolic_batch():
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    m = _single(
        node,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 7, 16, 32]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 7, 32, 24]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    norm = normalize_model(m)
    assert build_graph(norm, batch=1).ops[0].flops == 2 * 7 * 16 * 24 * 32
    assert build_graph(norm, batch=3).ops[0].flops == 3 * 2 * 7 * 16 * 24 * 32
    assert build_graph(norm, batch=3).nbytes("a") == 3 * 7 * 16 * 32 * 4


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_models_fold_weights_in_disguise(name):
    m = load_model(name)
    g = build_graph(normalize_model(m), name)
    kinds = {op.op_type for op in g.ops}
    assert "ConstantOfShape" not in kinds, "weights in disguise must not be planned as ops"
    assert g.param_bytes > 1_000_000, "folded weights count as parameter bytes"
    n_const = sum(1 for n in m.graph.node if n.op_type == "ConstantOfShape")
    assert len(g.ops) <= len(m.graph.node) - n_const
    assert g.inputs and g.outputs
    assert all(t not in g.const_bytes for t in g.inputs)
    # nothing a compute op reads as an activation is a constant
    for op in g.ops:
        for t in op.inputs:
            assert (t in g.const_bytes) == (t in op.const_inputs)


def test_vgg19_fc6_is_a_parameter_not_an_activation():
    g = build_graph(normalize_model(load_model("vgg19")), "vgg19")
    # VGG-19 has ~143.7 M parameters (574.7 MB fp32); fc6 alone is 102.8 M (411 MB)
    assert 570e6 < g.param_bytes < 580e6
    biggest = max(g.const_bytes.values())
    assert biggest == 25088 * 4096 * 4


def test_normalize_names_unique_stable_and_ir():
    m = load_model("squeezenet")
    a, b = normalize_model(m), normalize_model(m)
    names = [n.name for n in a.graph.node]
    assert len(set(names)) == len(names) and all(names)
    assert names == [n.name for n in b.graph.node]
    assert a.ir_version >= 7
    real = {i.name for i in a.graph.input}
    assert real == {"data_0"}


def test_if_node_kept_whole_with_outer_scope_reads():
    g = build_graph(normalize_model(CASES["if"]()), "if")
    ifs = [op for op in g.ops if op.op_type == "If"]
    assert len(ifs) == 1
    op = ifs[0]
    # its branches read tensors of the outer scope: they count as its inputs
    assert len(op.inputs) > 1


def test_corrupt_graph_raises_model_error():
    node = helper.make_node("Relu", ["missing"], ["y"])
    m = _single(node, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ModelError):
        build_graph(normalize_model(m))
