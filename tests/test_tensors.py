"""meshai.tensors: input specs, deterministic random inputs, the .npz layout and its errors, diffs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from models_helper import CASES, branchy_model, dynamic_batch_model, shape_model
from onnx import TensorProto, helper

from meshai.errors import ConfigError
from meshai.models import load_model
from meshai.tensors import (
    InputSpec,
    input_specs,
    load_npz,
    max_abs_diff,
    random_inputs,
    request_slices,
    save_npz,
    stack_requests,
)


def typed_model() -> onnx.ModelProto:
    """Inputs of several dtypes, one with a symbolic non-batch dim; outputs them through Identity."""
    ins = [
        helper.make_tensor_value_info("f", TensorProto.FLOAT, ["B", 2]),
        helper.make_tensor_value_info("i", TensorProto.INT64, ["B", "T"]),
        helper.make_tensor_value_info("m", TensorProto.BOOL, [3]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT16, [1, None]),
        helper.make_tensor_value_info("u", TensorProto.UINT8, []),
    ]
    outs = [helper.make_tensor_value_info(f"o_{v.name}", v.type.tensor_type.elem_type, None) for v in ins]
    nodes = [helper.make_node("Identity", [v.name], [f"o_{v.name}"]) for v in ins]
    m = helper.make_model(
        helper.make_graph(nodes, "typed", ins, outs), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    return m


# --------------------------------------------------------------------------- specs and random inputs


def test_input_specs_light_model_drops_initializer_inputs() -> None:
    raw = load_model("squeezenet")  # IR 3: every initializer is also listed as a graph input
    assert len(raw.graph.input) > 1
    specs = input_specs(raw)
    assert specs == [InputSpec("data_0", np.dtype(np.float32), (1, 3, 224, 224))]


def test_input_specs_types_and_symbolic_dims() -> None:
    specs = {s.name: s for s in input_specs(typed_model())}
    assert specs["f"].shape == ("B", 2) and specs["f"].dtype == np.float32
    assert specs["i"].dtype == np.int64 and specs["i"].shape == ("B", "T")
    assert specs["h"].shape == (1, "?") and specs["h"].dtype == np.float16
    assert specs["u"].shape == () and specs["m"].dtype == np.bool_
    name, dtype, shape = input_specs(dynamic_batch_model())[0]  # unpacks like a tuple
    assert (name, dtype, shape) == ("x", np.dtype(np.float32), ("N", 3, 8, 8))


def test_random_inputs_dtypes_shapes_and_ranges() -> None:
    x = random_inputs(typed_model(), batch=4)
    assert x["f"].shape == (4, 2) and x["f"].dtype == np.float32
    assert x["i"].shape == (4, 4) and x["i"].dtype == np.int64
    assert x["i"].min() >= 0 and x["i"].max() < 10
    assert x["m"].dtype == np.bool_ and x["m"].shape == (3,)
    assert x["h"].shape == (1, 4) and x["h"].dtype == np.float16
    assert x["u"].shape == () and x["u"].dtype == np.uint8
    big = random_inputs(dynamic_batch_model(), batch=2, seed=5)["x"]
    assert abs(float(big.mean())) < 0.2 and 0.8 < float(big.std()) < 1.2  # standard normal


def test_random_inputs_deterministic_per_seed() -> None:
    for build in CASES.values():
        m = build()
        a, b = random_inputs(m, seed=7), random_inputs(m, seed=7)
        assert list(a) == [s.name for s in input_specs(m)]
        assert all(np.array_equal(a[k], b[k]) for k in a)
        c = random_inputs(m, seed=8)
        assert any(not np.array_equal(a[k], c[k]) for k in a if a[k].dtype.kind == "f")


def test_random_inputs_requests_axis() -> None:
    m = branchy_model()
    x = random_inputs(m, seed=2, requests=5)
    assert {k: v.shape for k, v in x.items()} == {"cam0": (5, 1, 3, 16, 16), "cam1": (5, 1, 3, 16, 16)}
    assert len(request_slices(x)) == 5
    y = random_inputs(dynamic_batch_model(), batch=3, requests=2)
    assert y["x"].shape == (2, 3, 3, 8, 8)
    assert random_inputs(m, requests=0)["cam0"].shape == (0, 1, 3, 16, 16)


def test_random_inputs_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="batch must be >= 1, got 0"):
        random_inputs(shape_model(), batch=0)
    with pytest.raises(ConfigError, match="requests must be >= 0, got -1"):
        random_inputs(shape_model(), requests=-1)
    m = typed_model()
    m.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(ConfigError, match="input 'f' has no shape"):
        random_inputs(m)


# --------------------------------------------------------------------------- npz files


def test_npz_round_trip_keeps_names_dtypes_and_layout(tmp_path: Path) -> None:
    reqs = [random_inputs(typed_model(), batch=2, seed=s) for s in range(3)]
    stacked = stack_requests(reqs)
    assert stacked["f"].shape == (3, 2, 2)
    stacked["gpu_0/data_0"] = np.arange(6, dtype=np.float32).reshape(3, 1, 2)  # a '/' in an ONNX name
    path = tmp_path / "in.npz"
    save_npz(path, stacked)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    back = load_npz(path, list(stacked))
    assert list(back) == list(stacked)
    for k, v in stacked.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    again = request_slices(back)
    assert len(again) == 3
    for r0, r1 in zip(reqs, again, strict=True):
        for k in r0:
            assert np.array_equal(r0[k], r1[k])
    # written exactly where asked: no '.npz' suffix appended
    other = tmp_path / "data.bin"
    save_npz(other, {"x": np.zeros((1, 2), np.float32)})
    assert other.is_file() and list(load_npz(other)) == ["x"]
    # numpy's own np.savez files read the same way
    np.savez(tmp_path / "np.npz", x=np.ones((2, 1)))
    assert load_npz(tmp_path / "np.npz", ["x"])["x"].shape == (2, 1)


def test_load_npz_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'.*nope\.npz' does not exist"):
        load_npz(tmp_path / "nope.npz", ["x"])
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file at all")
    with pytest.raises(ConfigError, match=r"not a readable \.npz"):
        load_npz(junk, ["x"])
    single = tmp_path / "single.npz"
    with single.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ConfigError, match=r"single \.npy array"):
        load_npz(single, ["x"])
    good = tmp_path / "good.npz"
    save_npz(good, {"a": np.zeros((2, 3)), "b": np.zeros((2,))})
    with pytest.raises(ConfigError, match="lacks array 'c'"):
        load_npz(good, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="has array 'b', which is not one of a"):
        load_npz(good, ["a"])
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, a=np.zeros((2, 3)), b=np.zeros((3,)))
    with pytest.raises(ConfigError, match=r"'b' holds 3 requests but 'a' holds 2"):
        load_npz(uneven, ["a", "b"])
    scalar = tmp_path / "scalar.npz"
    np.savez(scalar, a=np.float32(1.0))
    with pytest.raises(ConfigError, match=r"'a' is a scalar"):
        load_npz(scalar)
    objs = tmp_path / "objs.npz"
    np.savez(objs, a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(ConfigError, match=r"not a readable \.npz"):
        load_npz(objs, ["a"])


def test_save_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'y' holds 1 requests but 'x' holds 2"):
        save_npz(tmp_path / "a.npz", {"x": np.zeros((2, 1)), "y": np.zeros((1, 1))})
    with pytest.raises(ConfigError, match="'x' is a scalar"):
        save_npz(tmp_path / "a.npz", {"x": np.float32(0)})
    with pytest.raises(ConfigError, match="'x' has dtype object"):
        save_npz(tmp_path / "a.npz", {"x": np.array([None], dtype=object)})
    assert not list(tmp_path.iterdir())


def test_stack_requests_errors() -> None:
    assert stack_requests([]) == {}
    with pytest.raises(ConfigError, match=r"request 1 has different tensors.*'y'"):
        stack_requests([{"x": np.zeros(2)}, {"x": np.zeros(2), "y": np.zeros(2)}])
    with pytest.raises(
        ConfigError, match=r"'x' of request 1 is float64\[3\], but request 0's is float64\[2\]"
    ):
        stack_requests([{"x": np.zeros(2)}, {"x": np.zeros(3)}])
    with pytest.raises(ConfigError, match="'b' holds 1 requests but 'a' holds 2"):
        request_slices({"a": np.zeros((2, 1)), "b": np.zeros((1, 1))})


# --------------------------------------------------------------------------- diffs


def test_max_abs_diff() -> None:
    a = {"x": np.array([1.0, 2.0], np.float32), "only_a": np.zeros(1)}
    assert max_abs_diff(a, {"x": np.array([1.0, 2.5], np.float64)}) == pytest.approx(0.5)
    assert max_abs_diff(a, {"other": np.zeros(1)}) == 0.0  # no common keys
    assert max_abs_diff(a, {"x": np.zeros(3, np.float32)}) == math.inf  # shapes differ
    nan = np.array([np.nan, 1.0])
    assert max_abs_diff({"x": nan}, {"x": np.array([0.0, 1.0])}) == math.inf
    assert max_abs_diff({"x": nan}, {"x": nan.copy()}) == 0.0
    inf = np.array([np.inf, 2.0])
    assert max_abs_diff({"x": inf}, {"x": np.array([np.inf, 2.0])}) == 0.0
    assert max_abs_diff({"x": inf}, {"x": np.array([-np.inf, 2.0])}) == math.inf
    assert max_abs_diff({"x": inf}, {"x": np.array([np.nan, 2.0])}) == math.inf
    ints = {"s": np.array([2, 3, 4], np.int64)}
    assert max_abs_diff(ints, {"s": np.array([2, 3, 7], np.int64)}) == 3.0
    assert max_abs_diff({"u": np.array([0], np.uint8)}, {"u": np.array([255], np.uint8)}) == 255.0
    assert max_abs_diff({"u": np.array([0], np.uint64)}, {"u": np.array([2**63 + 5], np.uint64)}) > 9e18
    assert max_abs_diff({"b": np.array([True, False])}, {"b": np.array([True, True])}) == 1.0
    assert max_abs_diff({"e": np.zeros((0, 3))}, {"e": np.zeros((0, 3))}) == 0.0
    assert max_abs_diff({"t": np.array(["a"])}, {"t": np.array(["b"])}) == math.inf
    assert max_abs_diff({"z": np.float32(1.5)}, {"z": np.float32(1.0)}) == 0.5
