"""Runtimes as node backends: ORT Mobile and LiteRT beside onnxruntime, one pipeline mixing them.

Real conversions (onnxruntime's own ``.ort`` tool; onnx2tf in ``.venv-convert`` for LiteRT), real
runners, real node processes with signed packages.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from runtime_helpers import Nodes, assert_one_line_error, meshai, test_secrets, unique_mesh

from meshai.artifacts import build_artifacts, to_ort
from meshai.capabilities import resolve_profiles, swarm
from meshai.cnn import small_cnn
from meshai.errors import ConfigError, PlanError
from meshai.plan import Constraints
from meshai.planning import load_for_planning, make_plan
from meshai.tensors import random_inputs, request_slices
from nodes.executor import StageSession
from nodes.executors import artifact_path, check_runtimes, cut_key, detect_runtimes, planner_artifacts
from scheduler.extract import extract_cut

#: fp32 stages on any runtime: outputs within this of the whole model (the issue's bound).
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rt") / "cnn.onnx"
    onnx.save(small_cnn(seed=3), str(path))
    return path


def _caps(*runtimes: tuple[str, ...]) -> list[Any]:
    nodes = swarm(resolve_profiles(["cpu"] * len(runtimes)))
    return [dataclasses.replace(n, runtimes=r) for n, r in zip(nodes, runtimes, strict=True)]


def test_cut_keys_artifact_paths_and_runtime_flags() -> None:
    assert cut_key(["a", "b"], ["y"]) == cut_key(["b", "a"], ["y"]) != cut_key(["a"], ["y"])
    assert artifact_path("k", "ort-mobile") == "runtimes/k/ort-mobile.ort"
    assert artifact_path("k", "litert", "fp16") == "runtimes/k/litert-fp16.tflite"
    with pytest.raises(ConfigError, match="takes no converted artifact"):
        artifact_path("k", "onnxruntime")
    assert detect_runtimes()[:2] == ("onnxruntime", "ort-mobile")
    assert check_runtimes(["ort-mobile", "ort-mobile"]) == ("ort-mobile",)
    with pytest.raises(ConfigError, match="unknown runtime 'tvm'"):
        check_runtimes(["tvm"])


def test_ort_mobile_stage_agrees_and_records_its_operators(cnn_path: Path) -> None:
    """A stage converted to .ort runs on the ORT-format session and agrees with onnxruntime; the reduced
    operator configuration lists the ops a minimal build needs."""
    lm = load_for_planning(str(cnn_path))
    plan = make_plan(lm, _caps(("onnxruntime",), ("onnxruntime",)), Constraints(stages=2))
    s = plan.stages[1]
    stage = extract_cut(lm.model, lm.graph, s.inputs, s.outputs, "stage1")
    data, config = to_ort(stage)
    assert "ai.onnx;" in config and "Gemm" in config
    env = request_slices(random_inputs(lm.model, seed=1, requests=1))[0]
    feeds = {
        t: StageSession(extract_cut(lm.model, lm.graph, plan.stages[0].inputs, s.inputs, "s0")).run(env)[t]
        for t in s.inputs
    }
    ref = StageSession(stage).run(feeds)
    mobile = StageSession(data, ort_format=True)
    assert mobile.runtime == "ort-mobile"
    got = mobile.run(feeds)
    assert max(float(np.abs(got[t] - ref[t]).max()) for t in ref) <= FP32_TOL


def test_planner_keeps_refused_cuts_off_runtime_only_nodes(cnn_path: Path) -> None:
    """Measurements as planner data: a cut measured bad for ort-mobile is never placed on a node that
    has only ort-mobile; with ``artifacts_only`` such a node takes only cuts measured good."""
    lm = load_for_planning(str(cnn_path))
    caps = _caps(("onnxruntime",), ("ort-mobile",))
    first = make_plan(lm, caps, Constraints(stages=2))
    on_mobile = next(s for s in first.stages if s.node == caps[1].name)
    bad = {"ort-mobile": {frozenset(on_mobile.ops): False}}
    second = make_plan(lm, caps, Constraints(stages=2, artifacts=bad))
    assert all(frozenset(s.ops) != frozenset(on_mobile.ops) for s in second.stages if s.node == caps[1].name)
    good = {"ort-mobile": {frozenset(on_mobile.ops): True}}
    again = make_plan(lm, caps, Constraints(stages=2, artifacts=good, artifacts_only=True))
    assert [s.ops for s in again.stages] == [s.ops for s in first.stages]
    with pytest.raises(PlanError, match="runs only ort-mobile"):
        make_plan(lm, _caps(("ort-mobile",)), Constraints(stages=1, artifacts={}, artifacts_only=True))


def test_build_artifacts_measures_every_stage(cnn_path: Path) -> None:
    lm = load_for_planning(str(cnn_path))
    caps = _caps(("onnxruntime",), ("ort-mobile",), ("litert",))
    plan = make_plan(lm, caps, Constraints(stages=3))
    reqs = request_slices(random_inputs(lm.model, seed=2, requests=4))
    arts = build_artifacts(lm, plan, {c.name: c.runtimes for c in caps}, reqs)
    assert arts.failures() == []
    table = arts.table()["stages"]
    by_stage = {st["stage"]: st["artifacts"] for st in table.values()}
    node_of = {s.id: s.node for s in plan.stages}
    for sid, made in by_stage.items():
        want = {"n0": set(), "n1": {"ort-mobile"}, "n2": {"litert-fp32", "litert-fp16"}}[node_of[sid]]
        assert set(made) == want
        for rec in made.values():
            assert rec["ok"] and rec["rel_diff"] <= rec["tolerance"], rec
            assert rec["file"] in arts.package_files()
    measured = planner_artifacts(arts.table())
    assert set(measured) == {"ort-mobile", "litert", "litert-fp16"}
    assert all(all(v.values()) for v in measured.values())


def _sim(*args: str) -> dict[str, Any]:
    r = meshai("sim", *args, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


#: A pipeline with an fp16 LiteRT stage: the CNN's logits (magnitude ~7) within this of the whole model
#: (measured: 1.0e-3 to 1.9e-3 per stage).
FP16_TOL = 1e-2


@pytest.mark.process
@pytest.mark.parametrize(
    "model,litert,tol",
    [("cnn", "litert", FP32_TOL), ("squeezenet", "litert", FP32_TOL), ("cnn", "litert-fp16", FP16_TOL)],
)
def test_one_pipeline_one_stage_on_each_runtime(model: str, litert: str, tol: float, cnn_path: Path) -> None:
    """Three nodes, node i only the i-th runtime; three stages, one on each: every request answered,
    the final outputs within 1e-4 of the whole model for fp32 stages (``FP16_TOL`` with an fp16 LiteRT
    stage); each node reports the runtime it loaded its stage on; the converted stages' build-time
    measurements are in the JSON, fp16 LiteRT within its stated tolerance (5e-2 of the output scale)."""
    rep = _sim(
        "--model", str(cnn_path) if model == "cnn" else model, "--nodes", "3", "--stages", "3",
        "--runtimes", f"onnxruntime,ort-mobile,{litert}", "--requests", "40",
    )  # fmt: skip
    assert rep["errors"] == 0 and rep["ok"] == 40, rep.get("first_error")
    assert rep["max_abs_diff"] <= tol
    rt = rep["runtimes"]
    assert sorted(rt["loaded"].values()) == sorted([litert, "onnxruntime", "ort-mobile"])
    for st in rt["stages"]:
        assert rt["loaded"][str(st["stage"])] == st["runtime"]
        for rec in st["artifacts"].values():
            assert rec["ok"] and rec["rel_diff"] <= rec["tolerance"]
        if st["runtime"].startswith("litert"):
            assert rt["stages"][st["stage"]]["artifacts"]["litert-fp16"]["tolerance"] == 5e-2


@pytest.mark.process
def test_runtime_only_node_refuses_a_package_without_its_artifact(cnn_path: Path, tmp_path: Path) -> None:
    """A node with only ORT Mobile is asked for a stage of a package that carries no .ort artifacts:
    the deploy fails with one line naming the node, its runtime and the missing artifact."""
    sec = test_secrets()
    mesh = unique_mesh()
    with Nodes(mesh) as nodes:
        nodes.start("m0", "--trusted-key", str(sec.pub), "--runtime", "ort-mobile")
        nodes.wait_ready()
        data, _ = sec.package(cnn_path, "plain")
        pkg = tmp_path / "plain.pkg"
        pkg.write_bytes(data)
        r = meshai(
            "deploy", str(cnn_path), "--name", "x", "--package", str(pkg), "--mesh", mesh, "--wait", "1"
        )
        assert_one_line_error(r, "'m0' runs only ort-mobile", "carries no artifact")
    r = meshai("node", "--name", "z", "--runtime", "tvm", "--insecure")
    assert_one_line_error(r, "unknown runtime 'tvm'")


@pytest.mark.process
def test_bench_runtimes_rows() -> None:
    r = meshai("bench", "runtimes", "--models", "cnn", "--repeats", "1", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    rows = res["rows"]
    assert {row["runtime"] for row in rows} == {"onnxruntime", "ort-mobile", "litert-fp32", "litert-fp16"}
    for row in rows:
        assert row["model"] == "cnn" and row["stage"] in (0, 1, 2)
        assert "unavailable" not in row, row
        assert row["p50_ms"] > 0 and row["ratio"] > 0
        assert row["max_abs_diff"] <= (5e-2 if row["runtime"] == "litert-fp16" else FP32_TOL)


@pytest.mark.process
def test_package_built_with_artifacts_serves_a_runtime_only_node(cnn_path: Path, tmp_path: Path) -> None:
    """The host that builds packages converts a saved plan's stages (``meshai package build --runtimes
    ort-mobile --plan``), measured; ``meshai deploy`` reads which cuts the package carries and places one
    on a node that has only ORT Mobile — which can only load it from the package's .ort artifact (it
    refuses anything else, as the test above shows); answers are exact."""
    from nodes.executor import run_whole

    sec = test_secrets()
    plan_file = tmp_path / "plan.json"
    r = meshai("plan", str(cnn_path), "--profiles", "cpu,cpu", "--stages", "2", "--json")
    assert r.returncode == 0, r.stderr
    plan_file.write_text(r.stdout)
    pkg = tmp_path / "rtp.pkg"
    r = meshai(
        "package", "build", str(cnn_path), "--name", "rtp", "--version", "1", "-o", str(pkg),
        "--runtimes", "ort-mobile", "--plan", str(plan_file), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)
    assert built["runtimes"]["failures"] == []
    assert sum(f["path"].endswith(".ort") for f in built["files"]) == 2
    assert meshai("package", "sign", str(pkg), "--key", str(sec.key)).returncode == 0
    mesh = unique_mesh()
    with Nodes(mesh) as nodes:
        nodes.start("o0", "--trusted-key", str(sec.pub), "--runtime", "onnxruntime")
        nodes.start("m1", "--trusted-key", str(sec.pub), "--runtime", "ort-mobile")
        nodes.wait_ready()
        flags = ["--mesh", mesh, "--wait", "2"]
        r = meshai(
            "deploy", str(cnn_path), "--name", "rtp", "--package", str(pkg), "--stages", "2", *flags, "--json"
        )
        assert r.returncode == 0, r.stderr
        assert {s["node"] for s in json.loads(r.stdout)["plan"]["stages"]} == {"o0", "m1"}
        reqs = request_slices(random_inputs(onnx.load(str(cnn_path)), seed=6, requests=5))
        np.savez(tmp_path / "in.npz", image=np.stack([q["image"] for q in reqs]))
        r = meshai(
            "infer",
            "rtp",
            "--inputs",
            str(tmp_path / "in.npz"),
            "--outputs",
            str(tmp_path / "out.npz"),
            *flags,
        )
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out.npz") as z:
        for i, q in enumerate(reqs):
            want = run_whole(onnx.load(str(cnn_path)), q)["logits"]
            assert float(np.abs(z["logits"][i] - want).max()) <= FP32_TOL
