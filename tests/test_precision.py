"""Precision chosen with placement (issue 8): the pure planner on measured int8 figures, the measured
check of a plan, int8 stages built from the calibration (entry and node alike), int8 tensors on the
wire, and a mixed-precision pipeline over real node processes against the planned model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
from runtime_helpers import MESHAI, WatchedRun, assert_one_line_error, child_env

from meshai.errors import InferenceError, PlanError
from meshai.plan import Constraints
from meshai.planning import (
    LoadedModel,
    load_for_planning,
    plan_measured,
    prepare_quantization,
    stage_models,
    swarm_from_flags,
)
from nodes.executor import run_stages
from scheduler.partition import plan
from scheduler.precision import int8_wire, predicted_drop
from scheduler.quantize import quantize, run_model, wire_int8

pytest.importorskip("sklearn")

DROPS = {"fc1": 0.2, "fc2": 0.2, "fc3": 0.1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from meshai.digits import train_digits

    return train_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def loaded(digits: Any) -> LoadedModel:
    return load_for_planning(str(digits.model))


@pytest.fixture(scope="module")
def quantized(digits: Any, loaded: LoadedModel) -> Iterator[tuple[LoadedModel, Any]]:
    yield prepare_quantization(loaded, str(digits.calibration), str(digits.eval), str(digits.labels))


def _c(**kw: Any) -> Constraints:
    return Constraints(int8_drop_pts=dict(DROPS), whole_int8_drop_pts=0.4, **kw)


# ----------------------------------------------------------------------------------- the pure planner


def test_int8_only_node_gets_int8_stages(loaded: LoadedModel) -> None:
    p = plan(loaded.graph, swarm_from_flags("cpu,tpu"), _c(max_accuracy_drop=1.0, stages=2))
    by_node = {s.node: s for s in p.stages}
    assert by_node["n1"].precision == "int8" and by_node["n1"].accelerator == "tpu"
    assert p.predicted.accuracy_drop_pts is not None and 0 < p.predicted.accuracy_drop_pts <= 1.0
    assert p.predicted.accuracy_drop_pts == predicted_drop(
        [o for s in p.stages if s.precision == "int8" for o in s.ops], _c()
    )


def test_budget_zero_refuses_int8_and_names_the_constraint(loaded: LoadedModel) -> None:
    p = plan(loaded.graph, swarm_from_flags("cpu,tpu"), _c(max_accuracy_drop=0.0))
    assert all(s.precision == "fp32" for s in p.stages) and p.predicted.accuracy_drop_pts is None
    assert any("n1 (tpu)" in n and "--max-accuracy-drop 0" in n for n in p.notes), p.notes
    with pytest.raises(PlanError, match=r"int8 is blocked by --max-accuracy-drop 0"):
        plan(loaded.graph, swarm_from_flags("cpu,tpu"), _c(max_accuracy_drop=0.0, stages=2))
    with pytest.raises(PlanError, match=r"needs a quantized variant"):
        plan(loaded.graph, swarm_from_flags("tpu"))  # no int8 variant at all


def test_costly_op_kept_off_int8_within_budget(loaded: LoadedModel) -> None:
    """fc1 alone costs 2 points: with a 1-point budget it must run on a non-int8 stage, while the int8-only
    node still takes what it can."""
    c = Constraints(int8_drop_pts={"fc1": 2.0, "fc2": 0.1, "fc3": 0.1}, max_accuracy_drop=1.0, stages=2)
    p = plan(loaded.graph, swarm_from_flags("gpu,tpu"), c)
    prec = {o: s.precision for s in p.stages for o in s.ops}
    assert prec["fc1"] != "int8"
    assert any(s.precision == "int8" for s in p.stages)
    assert p.predicted.accuracy_drop_pts is not None and p.predicted.accuracy_drop_pts <= 1.0


def test_predicted_drop_sums_and_respects_the_whole_model() -> None:
    c = _c()
    assert predicted_drop(["fc1"], c) == 0.2
    assert predicted_drop(["fc1", "relu1", "fc3"], c) == 0.3
    assert predicted_drop(["fc1", "fc2", "fc3"], c) == 0.5  # the sum, more than the whole model's 0.4
    c2 = dataclasses.replace(c, whole_int8_drop_pts=0.9)
    assert predicted_drop(["fc1", "fc2", "fc3", "relu1"], c2) == 0.9
    assert predicted_drop([], c) == 0.0


def test_int8_tensors_between_int8_stages_cost_a_quarter(loaded: LoadedModel) -> None:
    nodes = swarm_from_flags("tpu,tpu")
    p = plan(loaded.graph, nodes, _c(max_accuracy_drop=1.0, stages=2))
    assert [s.precision for s in p.stages] == ["int8", "int8"]
    first, second = p.stages
    (t,) = [x for x in first.outputs if x in second.inputs]
    fp32_bytes = loaded.graph.nbytes(t)
    assert first.bytes_out == fp32_bytes // 4
    wire = int8_wire(p, loaded.graph)
    assert wire == {0: [t], 1: [t]}
    fp = plan(loaded.graph, swarm_from_flags("cpu,cpu"), Constraints(stages=2))
    assert fp.stages[0].bytes_out == loaded.graph.nbytes(fp.stages[0].outputs[0])


# --------------------------------------------------------------------- measured, built, run in order


def test_plan_measured_keeps_the_measured_budget(quantized: tuple[LoadedModel, Any]) -> None:
    lm, q = quantized
    assert q.profile.metric == "accuracy" and set(q.profile.op_drop_pts) == {"fc1", "fc2", "fc3"}
    p = plan_measured(lm, swarm_from_flags("cpu,tpu"), Constraints(stages=2, max_accuracy_drop=1.0), q)
    assert any(s.precision == "int8" and s.accelerator == "tpu" for s in p.stages)
    assert p.predicted.accuracy_drop_pts is not None and p.predicted.accuracy_drop_pts <= 1.0
    assert any("measured on" in n for n in p.notes), p.notes


def test_int8_stages_in_order_equal_the_planned_mixed_model(quantized: tuple[LoadedModel, Any]) -> None:
    """The entry's int8 stage models (quantized from the calibration, int8 between them on the wire)
    run in order compute exactly the whole model with the same ops quantized."""
    lm, q = quantized
    p = plan_measured(lm, swarm_from_flags("tpu,tpu"), Constraints(stages=2, max_accuracy_drop=1.0), q)
    models = stage_models(lm, p)
    boundary = int8_wire(p, lm.graph)[0]
    assert boundary and all(
        o.type.tensor_type.elem_type == onnx.TensorProto.INT8
        for o in models[0].graph.output
        if o.name in boundary
    )
    mixed = quantize(lm.model, q.calibration, [o for s in p.stages for o in s.ops])
    want = run_model(mixed, q.samples[:50])
    fp32 = run_model(lm.model, q.samples[:50])
    worst_fp32 = 0.0
    for sample, w, f in zip(q.samples[:50], want, fp32, strict=True):
        got = run_stages(models, p, dict(sample))
        for k in w:
            np.testing.assert_allclose(got[k], w[k], rtol=0, atol=1e-5)
            worst_fp32 = max(worst_fp32, float(np.abs(got[k] - f[k]).max()))
    assert worst_fp32 > 0  # int8 is not exact, and the report says so rather than pretend


def test_wire_int8_rejects_a_tensor_without_its_qdq_pair(loaded: LoadedModel) -> None:
    with pytest.raises(InferenceError, match="neither an input nor an output"):
        wire_int8(loaded.model, ["no-such-tensor"])
    with pytest.raises(InferenceError, match="QuantizeLinear"):
        wire_int8(loaded.model, [loaded.graph.outputs[0]])  # an fp32 model has no Q/DQ to drop


# ------------------------------------------------------------------------------------------ the CLI


def test_cli_plan_with_calibration(digits: Any) -> None:
    cmd = [*MESHAI, "plan", str(digits.model), "--profiles", "cpu,tpu", "--stages", "2"]
    cmd += [
        "--calibration",
        str(digits.calibration),
        "--eval",
        str(digits.eval),
        "--labels",
        str(digits.labels),
    ]
    r = subprocess.run([*cmd, "--max-accuracy-drop", "1.0", "--json"], capture_output=True, text=True,
                       timeout=120, env=child_env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {s["node"]: s["precision"] for s in out["stages"]}["n1"] == "int8"
    assert 0 <= out["predicted"]["accuracy_drop_pts"] <= 1.0
    assert out["quantization"]["metric"] == "accuracy" and out["quantization"]["fp32_accuracy"] >= 95
    r0 = subprocess.run([*cmd, "--max-accuracy-drop", "0"], capture_output=True, text=True, timeout=120,
                        env=child_env())  # fmt: skip
    assert_one_line_error(r0, "int8 is blocked by --max-accuracy-drop 0")


# ----------------------------------------------------------------------- over real node processes


@pytest.mark.process
@pytest.mark.timeout(240)
def test_sim_mixed_precision_over_node_processes(digits: Any) -> None:
    """cpu + tpu nodes over mutual TLS; the model and its calibration in one signed, encrypted package;
    each node quantizes its own stage.  Outputs equal the planned mixed-precision model, the accuracy
    delta is measured on labelled data, and the int8 tensor between the stages is a quarter the size."""
    w = WatchedRun(
        "sim", "--model", str(digits.model), "--profiles", "cpu,tpu", "--stages", "2",
        "--calibration", str(digits.calibration), "--eval", str(digits.eval), "--labels", str(digits.labels),
        "--max-accuracy-drop", "1.0", "--requests", "200", "--json", timeout=200,
    )  # fmt: skip
    r = w.run()
    assert r.returncode == 0, r.stderr
    assert w.leftovers() == []
    rep = json.loads(r.stdout)
    assert rep["ok"] == 200 and rep["errors"] == 0, rep.get("first_error")
    pr = rep["precision"]
    assert "int8" in pr["stages"].values()
    assert pr["max_abs_diff_mixed"] <= 1e-5
    assert rep["max_abs_diff"] == pytest.approx(pr["expected_max_abs_diff"], abs=1e-5)
    assert pr["accuracy_delta_pts"] is not None and pr["accuracy_delta_pts"] <= 1.0
    assert pr["fp32_accuracy"] >= 95
    stages = rep["plan"]["stages"]
    if all(s["precision"] == "int8" for s in stages):
        assert stages[0]["bytes_out"] == 128  # 128 floats sent as int8
