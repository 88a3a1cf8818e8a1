"""A small CNN with real (random, He-initialised) weights, for size and speed figures of int8.

The light models in the onnx wheel hold constant weights, so quantizing them says nothing; this one
holds about 94 k distinct float32 weights (≈ 370 KiB).  It has no labels: measure int8 against it as
top-1 agreement with the fp32 model.  Averaged random features hardly depend on the input, so with a
random classifier bias every input would get the same class and agreement would prove nothing: the
classifier's bias instead centres each logit over standard-normal inputs (a data-dependent init),
and top-1 follows the input.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = ["small_cnn"]

INPUT = "image"
OUTPUT = "logits"
OPSET = 17
#: Standard-normal images the classifier bias is centred over.
CENTRE_SAMPLES = 64


def small_cnn(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Input ``image`` float32 [N,3,32,32] → Conv(3→32)+Relu → Conv(32→64)+Relu → MaxPool 2×2 →
    Conv(64→128)+Relu → GlobalAveragePool → Flatten → Gemm(128→classes) → ``logits`` [N,classes].
    Weights are He-initialised from ``seed``; conv biases are small and random, and the classifier's
    bias centres the logits over ``CENTRE_SAMPLES`` standard-normal images."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def param(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name
            )
        )
        return name

    def bias(name: str, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name))
        return name

    nodes: list[onnx.NodeProto] = []
    cur = INPUT
    for k, (cin, cout) in enumerate(((3, 32), (32, 64), (64, 128)), start=1):
        w = param(f"conv{k}.weight", (cout, cin, 3, 3), cin * 9)
        b = bias(f"conv{k}.bias", cout)
        nodes.append(helper.make_node("Conv", [cur, w, b], [f"conv{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"], name=f"relu{k}"))
        cur = f"relu{k}"
        if k == 2:
            nodes.append(
                helper.make_node(
                    "MaxPool", [cur], ["pool2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            cur = "pool2"
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1))
    w = param("fc.weight", (classes, 128), 128)
    b = bias("fc.bias", classes)
    features = _mean_features(_model(nodes, inits, "features", 128), rng)
    inits[-1].CopyFrom(
        numpy_helper.from_array(-(numpy_helper.to_array(inits[-2]) @ features).astype(np.float32), b)
    )
    nodes.append(helper.make_node("Gemm", ["features", w, b], [OUTPUT], name="fc", transB=1))
    return _model(nodes, inits, OUTPUT, classes)


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], output: str, width: int
) -> onnx.ModelProto:
    """The graph of ``nodes`` with the initializers it uses, ``output`` [N, width] as its output."""
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width])],
        initializer=[t for t in inits if t.name in used],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshai")
    onnx.checker.check_model(model)
    return model


def _mean_features(features: onnx.ModelProto, rng: np.random.Generator) -> np.ndarray:
    """The mean of the ``features`` model's output over ``CENTRE_SAMPLES`` standard-normal images."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(features.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((CENTRE_SAMPLES, 3, 32, 32)).astype(np.float32)
    out = np.asarray(sess.run(None, {INPUT: x})[0], np.float64)
    return np.asarray(out.mean(axis=0))
