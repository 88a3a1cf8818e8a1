"""Stage extraction: every stage model is valid ONNX, and running the stages in order equals the whole
model (graph outputs within 1e-5, every tensor crossing a cut too), for every light model and every
helper model, on real onnxruntime."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import pytest
from models_helper import CASES, branchy_model, dynamic_batch_model, if_model, shape_model, skip_model
from onnx import helper

from meshai.errors import ConfigError, InferenceError, ModelError
from meshai.models import LIGHT_MODELS, load_model
from meshai.plan import Plan, Predicted, Stage
from meshai.tensors import max_abs_diff, random_inputs
from nodes.executor import (
    CPU,
    StageSession,
    choose_providers,
    run_stages,
    run_whole,
    session_options,
)
from scheduler.extract import extract_assignment, extract_plan, extract_stage, stage_types
from scheduler.graph import GraphIR, build_graph, normalize_model
from scheduler.stages import StageSpec, split_stages

TOL = 1e-5
HEAVY = {"vgg19", "zfnet512", "bvlc_alexnet"}  # hundreds of MB of weights made at session creation


# --------------------------------------------------------------------------- helpers


def chunks(n: int, k: int) -> list[int]:
    """Contiguous assignment of n ops to k devices, as even as possible."""
    return [min(k - 1, pos * k // n) for pos in range(n)]


def level_assignment(graph: GraphIR) -> list[int]:
    """Acyclic two-device assignment by depth level: ops nearer the inputs than a threshold level go
    to device 0, the rest to device 1.  Every edge goes from a lower level to a higher one, so the
    stages cannot form a cycle; parallel branches interleave in node order, so (with the threshold
    picked for it, nearest the middle) the stages are not contiguous."""
    level: list[int] = []
    for op in graph.ops:
        srcs = [level[graph.producer[t]] for t in op.inputs if t in graph.producer]
        level.append(1 + max(srcs, default=-1))
    top = max(level) + 1
    for cut in sorted(range(1, top), key=lambda c: abs(2 * c - top)):
        assignment = [0 if lv < cut else 1 for lv in level]
        if not is_contiguous(assignment):
            return assignment
    return [0 if lv < top // 2 else 1 for lv in level]


def is_contiguous(assignment: Sequence[int]) -> bool:
    seen: list[int] = []
    for d in assignment:
        if not seen or seen[-1] != d:
            if d in seen:
                return False
            seen.append(d)
    return True


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model that also outputs ``tensors`` (typed from shape inference)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types = stage_types(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            v = types.get(t)
            m.graph.output.append(v if v is not None else helper.make_empty_tensor_value_info(t))
            have.add(t)
    return m


def defined_in(stage: onnx.ModelProto) -> set[str]:
    g = stage.graph
    return {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}


def check_stage_models(graph: GraphIR, specs: Sequence[StageSpec], models: Sequence[onnx.ModelProto]) -> None:
    """Structure: inputs/outputs as declared, no constant crosses a link, shared constants copied."""
    assert len(specs) == len(models)
    for k, (spec, sm) in enumerate(zip(specs, models, strict=True)):
        onnx.checker.check_model(sm)
        assert [i.name for i in sm.graph.input] == list(spec.inputs), k
        assert [o.name for o in sm.graph.output] == list(spec.outputs), k
        crossing = [t for t in spec.inputs if t in graph.const_bytes]
        assert not crossing, f"stage {k} receives constant tensors {crossing} over a link"
        inits = {t.name for t in sm.graph.initializer}
        read = {t for n in sm.graph.node for t in n.input} | {
            t for pos in spec.ops for t in graph.ops[pos].inputs
        }
        assert inits <= read, f"stage {k} carries unused initializers {sorted(inits - read)[:3]}"
    # a constant consumed in several stages is present in each of them
    for t in graph.const_bytes:
        users = {k for k, spec in enumerate(specs) for pos in spec.ops if t in graph.ops[pos].inputs}
        for k in users:
            assert t in defined_in(models[k]), f"constant {t!r} missing from stage {k}"


def cut_tensors(specs: Sequence[StageSpec]) -> list[str]:
    return sorted({t for s in specs for t in s.outputs})


def assert_close(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
    """Graph outputs: max abs diff < TOL and finite; cut tensors: within TOL relative to their scale."""
    for t in names:
        a, b = got[t], want[t]
        assert a.shape == b.shape and a.dtype == b.dtype, (t, a.shape, b.shape, a.dtype, b.dtype)
        if a.dtype.kind == "f":
            assert np.all(np.isfinite(a)), f"{t} has non-finite values"
            scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        else:
            scale = 1.0
        d = max_abs_diff({t: a}, {t: b})
        assert d < TOL * scale, f"tensor {t!r}: max abs diff {d} (scale {scale})"


def check_partition(
    model: onnx.ModelProto,
    graph: GraphIR,
    assignments: Sequence[Sequence[int]],
    feeds_list: Sequence[dict[str, np.ndarray]],
) -> None:
    """Extract each assignment, run its stages in order, compare with the whole model."""
    parts = [extract_assignment(model, graph, a) for a in assignments]
    for specs, models in parts:
        check_stage_models(graph, specs, models)
    cuts = sorted({t for specs, _ in parts for t in cut_tensors(specs)})
    whole = StageSession(with_outputs(model, cuts), name="whole")
    refs = [whole.run(feeds) for feeds in feeds_list]
    del whole
    for specs, models in parts:
        for feeds, ref in zip(feeds_list, refs, strict=True):
            # stage sessions are made and dropped one at a time: one stage's weights in memory at once
            everything = run_stages(models, specs, feeds)  # every stage's outputs
            assert set(graph.outputs) <= set(everything)
            for t in graph.outputs:
                got = everything[t]
                if got.dtype.kind == "f":
                    assert np.all(np.isfinite(got)), f"graph output {t!r} has non-finite values"
                assert max_abs_diff({t: got}, {t: ref[t]}) < TOL, t
            assert_close(everything, ref, cut_tensors(specs))


# --------------------------------------------------------------------------- light models


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in LIGHT_MODELS]
)
def test_light_model_partitions_equal_whole(name: str) -> None:
    model = normalize_model(load_model(name))
    graph = build_graph(model, name=name)
    n = len(graph.ops)
    assignments = [chunks(n, 2), chunks(n, 3)]
    if name == "inception_v1":  # branchy: one non-contiguous but acyclic assignment
        branchy = level_assignment(graph)
        assert not is_contiguous(branchy)
        assignments.append(branchy)
    check_partition(model, graph, assignments, [random_inputs(model, seed=1)])


def test_light_model_stages_carry_their_weights() -> None:
    """squeezenet's ConstantOfShape weights travel with the stage that uses them, never over a link."""
    model = normalize_model(load_model("squeezenet"))
    graph = build_graph(model, name="squeezenet")
    specs, models = extract_assignment(model, graph, chunks(len(graph.ops), 3))
    total = sum(n.op_type == "ConstantOfShape" for n in model.graph.node)
    per_stage = [sum(n.op_type == "ConstantOfShape" for n in sm.graph.node) for sm in models]
    assert sum(per_stage) == total and all(c > 0 for c in per_stage)
    for spec, sm in zip(specs, models, strict=True):
        assert {n.name for n in sm.graph.node if n.op_type == "ConstantOfShape"} == set(spec.const_ops)
        for i in sm.graph.input:
            assert graph.tensors[i.name].nbytes > 0 and i.name not in graph.const_bytes


# --------------------------------------------------------------------------- helper models


def all_splits(n: int, k: int) -> list[list[int]]:
    out = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        out.append([d for d in range(k) for _ in range(bounds[d], bounds[d + 1])])
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_helper_model_every_contiguous_split(case: str) -> None:
    model = normalize_model(CASES[case]())
    graph = build_graph(model, name=case)
    n = len(graph.ops)
    assignments = all_splits(n, 2) + all_splits(n, 3)[:: max(1, len(all_splits(n, 3)) // 12)]
    feeds = [random_inputs(model, seed=s) for s in (0, 1)]
    if case == "if":
        feeds = [{"x": np.full((1, 4), v, np.float32)} for v in (1.0, -1.0)]  # both branches
    check_partition(model, graph, assignments, feeds)


def test_branchy_non_contiguous_assignments() -> None:
    model = normalize_model(branchy_model())
    graph = build_graph(model, name="branchy")
    names = [op.name for op in graph.ops]
    cam0_and_head = [1 if nm.startswith("cam1") else 0 for nm in names]  # camera 1 on its own device
    three = [0 if nm.startswith("cam0") else 1 if nm.startswith("cam1") else 2 for nm in names]
    assert not is_contiguous(cam0_and_head)
    specs, _ = extract_assignment(model, graph, cam0_and_head)
    assert specs[0].inputs == ("cam1",) and specs[1].inputs == ("cam0", "cam1_g")
    check_partition(model, graph, [cam0_and_head, three, level_assignment(graph)], [random_inputs(model)])


def test_dynamic_batch_stages_run_for_any_batch() -> None:
    model = normalize_model(dynamic_batch_model())
    graph = build_graph(model, name="dynamic_batch")
    n = len(graph.ops)
    for assignment in all_splits(n, 2) + all_splits(n, 3):
        _, models = extract_assignment(model, graph, assignment)
        for sm in models:
            for v in list(sm.graph.input) + list(sm.graph.output):
                dims = v.type.tensor_type.shape.dim
                if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(dims) > 1:
                    assert dims[0].dim_param == "N", (v.name, dims)
    for batch in (1, 3):
        feeds = [random_inputs(model, batch=batch, seed=batch)]
        check_partition(model, graph, [chunks(n, 2), chunks(n, 3), all_splits(n, 2)[5]], feeds)
        out = run_whole(model, feeds[0])
        assert out["y"].shape == (batch, 5)


def test_shape_output_crossing_a_cut() -> None:
    """The int64 Shape output is a graph output and a cut tensor to the Reshape's stage."""
    model = normalize_model(shape_model())
    graph = build_graph(model, name="shape")
    names = [op.name for op in graph.ops]
    assignment = [0 if i <= names.index("shape") else 1 for i in range(len(names))]
    specs, models = extract_assignment(model, graph, assignment)
    assert "shape" in specs[0].outputs and "shape" in specs[1].inputs
    vi = next(i for i in models[1].graph.input if i.name == "shape")
    assert vi.type.tensor_type.elem_type == onnx.TensorProto.INT64
    feeds = random_inputs(model)
    got = run_stages(models, specs, feeds, outputs=graph.outputs)
    want = run_whole(model, feeds)
    assert got["shape"].dtype == np.int64 and list(got["shape"]) == [2, 3, 4]
    assert max_abs_diff(got, want) < TOL


def test_if_branches_take_outer_scope_tensors() -> None:
    model = normalize_model(if_model())
    graph = build_graph(model, name="if")
    names = [op.name for op in graph.ops]
    cut = names.index("branch")
    specs, models = extract_assignment(model, graph, [0 if i < cut else 1 for i in range(len(names))])
    assert "r" in specs[1].inputs  # read only inside the branches and by `join`
    inits = {t.name for t in models[1].graph.initializer}
    assert "w" in inits  # read inside the then-branch only
    assert "scale_const" in {n.name for n in models[1].graph.node}
    assert "w" in {t.name for t in models[0].graph.initializer}  # pre_mm needs it too


def test_skip_shared_constant_copied_into_both_stages() -> None:
    model = normalize_model(skip_model())
    graph = build_graph(model, name="skip")
    specs, models = extract_assignment(model, graph, chunks(len(graph.ops), 2))
    for sm in models:
        assert "bias_const" in {n.name for n in sm.graph.node}
    assert all("bias" not in s.inputs for s in specs)


def test_multi_io_output_also_consumed_later() -> None:
    model = normalize_model(CASES["multi_io"]())
    graph = build_graph(model, name="multi_io")
    names = [op.name for op in graph.ops]
    assignment = [0 if i <= names.index("relu_h") else 1 for i in range(len(names))]
    specs, models = extract_assignment(model, graph, assignment)
    assert specs[0].outputs == ("h",) and specs[0].routes == {"h": (1,)}
    assert set(specs[1].inputs) == {"h", "b"}  # graph input b read by both stages
    feeds = random_inputs(model)
    got = run_stages(models, specs, feeds, outputs=graph.outputs)
    assert list(got) == ["h", "out1", "out2"]
    assert max_abs_diff(got, run_whole(model, feeds)) < TOL


def test_model_local_functions_are_copied() -> None:
    swish = helper.make_function(
        "local",
        "Swish",
        ["a"],
        ["b"],
        [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["a", "s"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Swish", ["r"], ["y0"], name="swish", domain="local"),
        helper.make_node("Tanh", ["y0"], ["y"], name="tanh"),
    ]
    g = helper.make_graph(
        nodes,
        "fn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    model = normalize_model(helper.make_model(g, opset_imports=opsets, functions=[swish], ir_version=8))
    graph = build_graph(model, name="fn")
    check_partition(model, graph, all_splits(3, 2) + all_splits(3, 3), [random_inputs(model)])
    _, models = extract_assignment(model, graph, [0, 1, 1])
    assert all(len(m.functions) == 1 and m.functions[0].name == "Swish" for m in models)


# --------------------------------------------------------------------------- plans


def plan_from(graph: GraphIR, specs: Sequence[StageSpec]) -> Plan:
    stages = tuple(
        Stage(
            id=k,
            node=f"n{k}",
            accelerator="cpu",
            precision="fp32",
            ops=tuple(graph.ops[p].name for p in s.ops),
            inputs=s.inputs,
            outputs=s.outputs,
            routes=s.routes,
            const_ops=s.const_ops,
        )
        for k, s in enumerate(specs)
    )
    return Plan(
        objective="latency",
        stages=stages,
        predicted=Predicted(0.0, 0.0, 0, 0.0),
        model=graph.name,
        inputs=graph.inputs,
        outputs=graph.outputs,
    )


def test_extract_plan_runs_from_plan() -> None:
    model = normalize_model(load_model("resnet50"))
    graph = build_graph(model, name="resnet50")
    specs = split_stages(graph, chunks(len(graph.ops), 3))
    plan = Plan.from_json(plan_from(graph, specs).to_json())
    models = extract_plan(model, graph, plan)
    assert [m.graph.name for m in models] == ["stage0_n0", "stage1_n1", "stage2_n2"]
    feeds = random_inputs(model, seed=3)
    got = run_stages([m.SerializeToString() for m in models], plan, feeds)
    assert list(got) == list(graph.outputs)
    assert max_abs_diff(got, run_whole(model.SerializeToString(), feeds)) < TOL


# --------------------------------------------------------------------------- errors


def test_extract_errors_name_the_stage_and_culprit() -> None:
    model = normalize_model(skip_model())
    graph = build_graph(model, name="skip")
    spec = split_stages(graph, chunks(len(graph.ops), 2))[1]
    ops = [graph.ops[p].name for p in spec.ops]
    with pytest.raises(ModelError, match=r"'s1'.*'nope'"):
        extract_stage(model, graph, [*ops, "nope"], spec.const_ops, spec.inputs, spec.outputs, "s1")
    with pytest.raises(ModelError, match=r"'s1'.*reads tensor"):
        extract_stage(model, graph, ops, spec.const_ops, spec.inputs[1:], spec.outputs, "s1")
    with pytest.raises(ModelError, match=r"'s1'.*reads constant tensor 'bias'.*lack 'bias_const'"):
        extract_stage(model, graph, ops, (), spec.inputs, spec.outputs, "s1")
    with pytest.raises(ModelError, match=r"'s1'.*output 'c0'"):
        extract_stage(model, graph, ops, spec.const_ops, spec.inputs, ["c0"], "s1")
    with pytest.raises(ModelError, match=r"'s1'.*twice"):
        extract_stage(model, graph, [*ops, ops[0]], spec.const_ops, spec.inputs, spec.outputs, "s1")


def test_stage_session_checks_feeds() -> None:
    model = normalize_model(CASES["multi_io"]())
    sess = StageSession(model, name="st")
    assert sess.input_names == ("a", "b") and sess.output_names == ("h", "out1", "out2")
    assert sess.input_dtypes["a"] == np.float32 and sess.providers[-1] == CPU
    ok = random_inputs(model)
    assert set(sess.run(ok)) == {"h", "out1", "out2"}
    with pytest.raises(InferenceError, match=r"st: input 'b' is missing"):
        sess.run({"a": ok["a"]})
    with pytest.raises(InferenceError, match=r"feed 'zz'"):
        sess.run({**ok, "zz": ok["a"]})
    with pytest.raises(InferenceError, match=r"input 'a' must have dtype float32, got float64"):
        sess.run({**ok, "a": ok["a"].astype(np.float64)})
    with pytest.raises(InferenceError, match=r"input 'b' must have rank 2"):
        sess.run({**ok, "b": ok["b"][None]})
    with pytest.raises(InferenceError, match=r"input 'b' must have shape \[2, 8\]"):
        sess.run({**ok, "b": np.zeros((3, 8), np.float32)})
    with pytest.raises(InferenceError, match=r"input 'a' is a list"):
        sess.run({**ok, "a": [[1.0]]})
    sess.warmup()
    with pytest.raises(InferenceError, match="cannot load"):
        StageSession(b"not onnx", name="bad")


def test_stage_session_dynamic_warmup_and_runtime_errors() -> None:
    sess = StageSession(dynamic_batch_model().SerializeToString())
    assert sess.input_shapes["x"] == ("N", 3, 8, 8)
    sess.warmup(batch=4)
    with pytest.raises(InferenceError, match=r"'x' must have shape \[N, 3, 8, 8\]"):
        sess.run({"x": np.zeros((2, 3, 9, 8), np.float32)})


def test_providers_and_options() -> None:
    assert choose_providers(None) == [CPU]
    chosen = choose_providers(["CUDAExecutionProvider", CPU])
    assert chosen[-1] == CPU and set(chosen) <= {"CUDAExecutionProvider", CPU}
    with pytest.raises(ConfigError, match="'NopeExecutionProvider'"):
        choose_providers(["NopeExecutionProvider"])
    so = session_options(threads=1000)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert 1 <= so.intra_op_num_threads <= 1000 and so.inter_op_num_threads == so.intra_op_num_threads


def test_run_stages_errors() -> None:
    model = normalize_model(skip_model())
    graph = build_graph(model, name="skip")
    specs, models = extract_assignment(model, graph, chunks(len(graph.ops), 2))
    with pytest.raises(InferenceError, match=r"stage 0: input 'x'"):
        run_stages(models, specs, {})
    with pytest.raises(InferenceError, match="2 stage models for 1 stages"):
        run_stages(models, specs[:1], random_inputs(model))
    with pytest.raises(InferenceError, match="'nowhere'"):
        run_stages(models, specs, random_inputs(model), outputs=["nowhere"])
