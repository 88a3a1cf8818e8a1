"""The partitioner: determinism, objectives, stage counts, pins, op support, memory, clear errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
from models_helper import CASES

from meshai.capabilities import BUILTIN_PROFILES, NodeCapability, resolve_profiles, swarm
from meshai.errors import PlanError
from meshai.plan import Constraints, Plan
from meshai.planning import LoadedModel, check_plan, load_for_planning
from meshai.tensors import random_inputs
from scheduler.graph import build_graph, normalize_model
from scheduler.partition import plan


def _nodes(*kinds: str) -> list[NodeCapability]:
    return swarm(resolve_profiles(list(kinds)))


@pytest.fixture(scope="module")
def squeezenet() -> LoadedModel:
    return load_for_planning("squeezenet")


@pytest.fixture(scope="module")
def branchy() -> LoadedModel:
    m = normalize_model(CASES["branchy"]())
    return LoadedModel("branchy", m, build_graph(m, "branchy"))


def test_deterministic_byte_for_byte(squeezenet):
    nodes = _nodes("cpu", "gpu", "npu")
    for objective in ("latency", "throughput"):
        c = Constraints(objective=objective, stages=3)
        a = plan(squeezenet.graph, nodes, c).to_json()
        b = plan(squeezenet.graph, list(nodes), Constraints(objective=objective, stages=3)).to_json()
        assert a == b


def test_plan_json_round_trip(squeezenet):
    p = plan(squeezenet.graph, _nodes("cpu", "gpu", "npu"), Constraints(objective="throughput", stages=3))
    assert Plan.from_json(p.to_json()) == p
    d = p.to_dict()
    assert set(d) >= {"objective", "stages", "predicted"}
    for s in d["stages"]:
        assert set(s) >= {
            "id",
            "node",
            "accelerator",
            "precision",
            "ops",
            "inputs",
            "outputs",
            "predicted_ms",
        }
    assert set(d["predicted"]) == {"latency_ms", "bottleneck_ms", "transfer_bytes", "energy_mj"}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_stage_count_on_distinct_nodes(squeezenet, k):
    p = plan(squeezenet.graph, _nodes("cpu", "gpu", "npu"), Constraints(stages=k))
    assert len(p.stages) == k
    assert len(set(p.nodes)) == k
    # every compute op in exactly one stage; weights never cross a link
    ops = [o for s in p.stages for o in s.ops]
    assert sorted(ops) == sorted(op.name for op in squeezenet.graph.ops)
    for s in p.stages:
        assert not set(s.inputs) & set(squeezenet.graph.const_bytes)


def test_stages_more_than_nodes_is_plan_error(squeezenet):
    with pytest.raises(PlanError, match="--stages 4 needs 4 nodes"):
        plan(squeezenet.graph, _nodes("cpu", "gpu", "npu"), Constraints(stages=4))


def test_int8_only_nodes_take_no_stage_and_say_so(squeezenet):
    p = plan(squeezenet.graph, _nodes("cpu", "tpu", "mcu"))
    assert p.nodes == ("n0",)
    with pytest.raises(PlanError, match=r"n1 \(tpu\) runs only int8.*quantized"):
        plan(squeezenet.graph, _nodes("cpu", "tpu", "mcu"), Constraints(stages=2))
    with pytest.raises(PlanError, match="no node can run any variant"):
        plan(squeezenet.graph, _nodes("tpu", "mcu"))


def test_throughput_objective_balances_stages(squeezenet):
    nodes = _nodes("cpu", "cpu", "cpu")
    lat = plan(squeezenet.graph, nodes, Constraints(objective="latency"))
    thr = plan(squeezenet.graph, nodes, Constraints(objective="throughput"))
    assert len(lat.stages) == 1  # three equal CPUs on a link: one node is fastest end to end
    assert len(thr.stages) >= 2  # a pipeline over equal CPUs raises throughput
    assert thr.predicted.bottleneck_ms < lat.predicted.bottleneck_ms
    assert lat.predicted.latency_ms <= thr.predicted.latency_ms


def test_op_support_respected_lrn_never_on_npu():
    loaded = load_for_planning("bvlc_alexnet")
    p = plan(loaded.graph, _nodes("npu", "cpu"), Constraints(stages=2, objective="throughput"))
    lrn = {op.name for op in loaded.graph.ops if op.op_type == "LRN"}
    assert lrn
    for s in p.stages:
        if s.accelerator == "npu":
            assert not lrn & set(s.ops)


def test_unsupported_everywhere_names_the_op():
    loaded = load_for_planning("bvlc_alexnet")
    with pytest.raises(PlanError, match=r"\(LRN\) can run on no node: n0 \(npu\) does not support LRN"):
        plan(loaded.graph, _nodes("npu"))


def test_memory_limit_forces_a_split_and_is_respected():
    loaded = load_for_planning("vgg19")
    small = replace(BUILTIN_PROFILES["cpu"], memory_bytes=400 * 1024**2)
    nodes = [NodeCapability(name=f"n{i}", profile=small) for i in range(3)]
    p = plan(loaded.graph, nodes)
    assert len(p.stages) >= 2, "575 MB of weights cannot fit one 400 MiB node"
    for s in p.stages:
        assert s.memory_bytes <= small.memory_bytes
    tiny = replace(small, memory_bytes=64 * 1024**2)
    with pytest.raises(PlanError, match=r"needs .* bytes of memory; no node has enough"):
        plan(loaded.graph, [NodeCapability(name="n0", profile=tiny)])


def test_pins_keep_raw_camera_frames_on_their_robot(branchy):
    nodes = _nodes("cpu", "cpu", "gpu")
    p = plan(branchy.graph, nodes, Constraints(pins={"cam0": "n0", "cam1": "n1"}))
    for s in p.stages:
        if "cam0" in s.inputs:
            assert s.node == "n0"
        if "cam1" in s.inputs:
            assert s.node == "n1"
    consumers = {s.node for s in p.stages if "cam0" in s.inputs}
    assert consumers == {"n0"}
    assert {s.node for s in p.stages if "cam1" in s.inputs} == {"n1"}
    # each camera's first layer runs where its frame is born; the branches are separate stages
    assert "cam0_conv0" in p.stage_of("n0").ops
    assert "cam1_conv0" in p.stage_of("n1").ops
    assert p.stage_of("n0").id != p.stage_of("n1").id
    assert check_plan(branchy, p, random_inputs(branchy.model, seed=1)) < 1e-5


def test_bad_pins_are_plan_errors(branchy):
    nodes = _nodes("cpu", "gpu")
    with pytest.raises(PlanError, match="not an input of the model"):
        plan(branchy.graph, nodes, Constraints(pins={"nope": "n0"}))
    with pytest.raises(PlanError, match="no node named 'n9'"):
        plan(branchy.graph, nodes, Constraints(pins={"cam0": "n9"}))
    # a pinned input on a node that cannot run its consumer
    with pytest.raises(PlanError, match="pinned to 'n0', which runs only int8"):
        plan(branchy.graph, _nodes("tpu", "gpu"), Constraints(pins={"cam0": "n0"}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_helper_models_plan_and_run_exactly(case):
    m = normalize_model(CASES[case]())
    loaded = LoadedModel(case, m, build_graph(m, case))
    k = min(3, len(loaded.graph.ops))
    p = plan(loaded.graph, _nodes("cpu", "gpu", "npu"), Constraints(objective="throughput", stages=k))
    assert len(p.stages) == k
    assert check_plan(loaded, p, random_inputs(m, seed=2)) < 1e-5


def test_unknown_objective_is_an_error():
    with pytest.raises(PlanError, match="unknown objective"):
        Constraints(objective="fastest")
