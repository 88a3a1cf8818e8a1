"""Staged rollouts and A/B tests on real node processes (mutual TLS, signed packages).

Models: the small CNN with real weights, one seed per version, so that every output says which version
computed it (the two versions' outputs differ everywhere).  Each deployment packages under its own
name: a node's store keeps the highest version activated per package name.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from runtime_helpers import MESHAI, Nodes, assert_one_line_error, child_env, meshai, test_secrets, unique_mesh

from meshai.cnn import small_cnn
from meshai.split import split
from meshai.tensors import random_inputs, request_slices
from nodes.executor import run_whole

pytestmark = pytest.mark.process
NODES = ("v0", "v1", "v2")


def _sim(*args: str) -> dict[str, Any]:
    r = meshai("sim", *args, "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three versions of the CNN (different weights, same interface)."""
    d = tmp_path_factory.mktemp("versions")
    out = {}
    for v, seed in (("1", 3), ("2", 4), ("3", 5)):
        out[v] = d / f"cnn-v{v}.onnx"
        onnx.save(small_cnn(seed=seed), str(out[v]))
    return out


def _sim_flags(models: dict[str, Path], profiles: str = "cpu,gpu,npu") -> list[str]:
    return [
        "--model", str(models["1"]), "--rollout-to", str(models["2"]), "--profiles", profiles,
        "--pace", "--stages", "3", "--requests", "600",
    ]  # fmt: skip


def test_sim_healthy_rollout_reaches_every_stage_with_one_version_per_request(
    models: dict[str, Path],
) -> None:
    """A healthy new version goes 25 % → 50 % → 100 % and completes mid-stream.  Every stage stamps the
    version it ran on each request; every request's stamps cover all its stages and agree (no mixed
    request), and every output equals the whole model *of the version it was stamped with*."""
    rep = _sim(*_sim_flags(models))
    ro = rep["rollout"]
    assert rep["errors"] == 0 and rep["ok"] == 600 and rep["max_abs_diff"] == 0.0
    assert ro["final"] == "completed", ro["reason"]
    assert [s["action"] for s in ro["steps"]] == ["advance", "advance", "advance", "complete"]
    assert [s["share"] for s in ro["steps"]] == [0.25, 0.5, 1.0, 1.0]
    assert ro["mixed_version_requests"] == 0 and ro["lost"] == 0
    assert ro["stamped_requests"] == 600
    assert ro["served_by_version"]["1"] > 100 and ro["served_by_version"]["2"] > 100
    assert ro["last_requests_by_version"] == {"2": 50}
    for s in ro["steps"][1:]:
        assert all(g["ok"] in (True, None) for g in s["gates"].values()), s


def test_sim_slowed_canary_rolls_back_and_the_old_version_keeps_serving(models: dict[str, Path]) -> None:
    """The new version made 4x slower (each of its stages takes 4x its time): the p95 gate fails at
    the first stage, the rollout rolls back by itself with the figures in its reason, no request is
    lost or answered twice, and the old version serves everything after."""
    rep = _sim(*_sim_flags(models), "--canary-slowdown", "4")
    ro = rep["rollout"]
    assert rep["errors"] == 0 and rep["ok"] == 600 and rep["max_abs_diff"] == 0.0
    assert ro["final"] == "rolled_back"
    assert [s["action"] for s in ro["steps"]] == ["advance", "rollback"]
    assert "p95 latency" in ro["reason"] and "slower, over the 25 % allowed" in ro["reason"]
    assert ro["steps"][1]["gates"]["p95"]["ok"] is False
    assert ro["lost"] == 0 and rep["duplicated"] == 0 and ro["mixed_version_requests"] == 0
    assert ro["stamped_requests"] == 600
    assert 0 < ro["served_by_version"]["2"] < ro["served_by_version"]["1"]
    assert ro["last_requests_by_version"] == {"1": 50}


def test_sim_node_lost_during_the_canary_rolls_back_and_replays(models: dict[str, Path]) -> None:
    """The node running stage 1 is SIGKILLed while the canary serves its share: the current version is
    repaired and the canary's requests in flight replayed on it; the rollout rolls back naming the lost
    node; nothing is lost, repeated or mixed, and every output is exact."""
    rep = _sim(*_sim_flags(models, "cpu,gpu,npu,cpu"), "--kill", "stage:1@150")
    ro = rep["rollout"]
    assert rep["errors"] == 0 and rep["ok"] == 600 and rep["max_abs_diff"] == 0.0
    assert rep["lost"] == 0 and rep["duplicated"] == 0 and rep["replayed"] > 0
    assert rep["recovery_s"] is not None and 0 < rep["recovery_s"] < 3.0
    assert ro["final"] == "rolled_back" and "was lost" in ro["reason"], ro["reason"]
    assert ro["mixed_version_requests"] == 0 and ro["stamped_requests"] == 600


def test_sim_rollout_flags_are_checked(models: dict[str, Path]) -> None:
    r = meshai("sim", *_sim_flags(models), "--insecure", "--json")
    assert_one_line_error(r, "--rollout-to", "signed package")
    r = meshai("sim", "--model", str(models["1"]), "--canary-slowdown", "3", "--json")
    assert_one_line_error(r, "--canary-slowdown", "--rollout-to")
    r = meshai("sim", *_sim_flags(models), "--rollout-stages", "50%,20%,100%", "--json")
    assert_one_line_error(r, "strictly increasing")


def test_every_stage_reports_the_version_it_ran_for_every_request(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The library path (``Mesh.deploy`` + ``RolloutRunner`` + ``MeshVersions``) on three node processes:
    a rollout 50 % → 100 % mid-stream.  For every request, each stage of the generation it ran on
    reported (in the result's stamps) the version it ran, and all of them the generation's version;
    each output equals the whole model of that version, exactly."""
    from meshai.mesh import Mesh
    from meshai.planning import load_for_planning
    from meshai.rollouts import MeshVersions, RolloutRunner
    from meshai.sim import MeshSecrets, NodeProcesses
    from scheduler.rollout import RolloutConfig

    l1, l2 = load_for_planning(str(models["1"])), load_for_planning(str(models["2"]))
    names = ["w0", "w1", "w2"]
    mesh_id = unique_mesh()
    sec = MeshSecrets(tmp_path)
    for n in names:
        sec.issue(n)
    p1, p2 = sec.package(models["1"], "cnn", "1"), sec.package(models["2"], "cnn", "2")
    reqs = request_slices(random_inputs(l1.model, seed=2, requests=500))
    config = RolloutConfig(
        stages=(0.5, 1.0), bake_s=0.2, min_samples=20, max_p95_regression=2.0, max_drift=1.0
    )

    async def scenario() -> tuple[list[Any], list[Any], dict[str, Any], int]:
        async with Mesh(mesh=mesh_id, identity=sec.client) as mesh:
            await mesh.wait_for_peers(3, timeout=30)
            plan, _ = mesh.plan(l1, stages=3)
            async with mesh.deploy(plan, l1, package=p1) as pipe:
                runner = RolloutRunner(
                    pipe, MeshVersions(mesh, {"1": (l1, p1), "2": (l2, p2)}), "2", config, tick_s=0.05
                )
                outs: list[Any] = []
                async for out in pipe.stream(reqs):
                    outs.append(out)
                    if len(outs) == 50:
                        await runner.start()
                await runner.stop()
                return outs, list(pipe.version_trace), runner.status(), pipe.stats.mixed_versions

    with NodeProcesses(
        names, ["cpu"] * 3, mesh_id, pace=False, extra=sec.node_args(), identities=sec.identities
    ):
        outs, trace, status, mixed = asyncio.run(scenario())
    assert status["final"] == "completed", status["reason"]
    assert mixed == 0 and len(trace) == len(reqs)
    version_of = {}
    for rid, version, stamps, every_stage in trace:
        assert every_stage and len(stamps) == 3, (rid, stamps)
        assert set(stamps.values()) == {version}, (rid, version, stamps)
        version_of[rid - 1] = version
    assert set(version_of.values()) == {"1", "2"}
    wholes = {"1": onnx.load(str(models["1"])), "2": onnx.load(str(models["2"]))}
    for i, (req, out) in enumerate(zip(reqs, outs, strict=True)):
        want = run_whole(wholes[version_of[i]], req)
        assert all(np.array_equal(out[k], want[k]) for k in want), i


# ------------------------------------------------------------------------- long-lived deployments


class Swarm:
    """Three node processes; packages are built per deployment once the nodes exist (sealed for them)."""

    def __init__(self, work: Path, mesh: str, models: dict[str, Path]) -> None:
        self.work, self.mesh, self.models = work, mesh, models

    def flags(self) -> list[str]:
        return ["--mesh", self.mesh, "--wait", str(len(NODES)), "--timeout", "20"]

    def package(self, name: str, version: str) -> Path:
        data, _ref = test_secrets().package(self.models[version], name, version=version)
        path = self.work / f"{name}-{version}.pkg"
        path.write_bytes(data)
        return path

    def deploy(self, name: str) -> None:
        r = meshai(
            "deploy", str(self.models["1"]), "--name", name, "--package", str(self.package(name, "1")),
            "--entry", "v0", "--stages", "2", *self.flags(), "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return meshai(*args, *self.flags(), timeout=120)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Swarm]:
    sec = test_secrets()
    mesh = unique_mesh()
    with Nodes(mesh) as nodes:
        for n in NODES:
            nodes.start(n, "--trusted-key", str(sec.pub))
        nodes.wait_ready()
        yield Swarm(tmp_path_factory.mktemp("rollouts"), mesh, models)


class Client:
    """Requests through a deployment's entry from a Mesh client on its own thread: each answer is kept
    with the time it came back, until ``stop``."""

    def __init__(self, swarm: Swarm, name: str, workers: int = 4) -> None:
        self.swarm, self.name, self.workers = swarm, name, workers
        self.reqs = request_slices(random_inputs(onnx.load(str(swarm.models["1"])), seed=9, requests=64))
        self.answers: list[tuple[float, int, dict[str, np.ndarray]]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        from meshai.mesh import Mesh

        async with Mesh(mesh=self.swarm.mesh) as mesh:
            await mesh.wait_for_peers(len(NODES), timeout=20)
            dep = await mesh.attach(self.name)

            async def worker(k: int) -> None:
                i = k
                while not self._stop.is_set():
                    j = i % len(self.reqs)
                    try:
                        out = await dep.infer(self.reqs[j], timeout=30)
                        self.answers.append((time.monotonic(), j, out))
                    except Exception as exc:  # kept and asserted on
                        self.errors.append(exc)
                    i += self.workers

            await asyncio.gather(*(worker(k) for k in range(self.workers)))

    def __enter__(self) -> Client:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.answers and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)
        assert self.answers, f"no answer from {self.name}: {self.errors[:1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def version_of(self, j: int, out: dict[str, np.ndarray]) -> str:
        """Which version's whole model computed ``out`` for request ``j`` (exactly), or ''."""
        for v, path in self.swarm.models.items():
            want = run_whole(onnx.load(str(path)), self.reqs[j])
            if all(np.array_equal(out[k], want[k]) for k in want):
                return v
        return ""


def test_node_hosted_rollout_completes_and_only_a_signed_instruction_goes_back(swarm: Swarm) -> None:
    """``meshai rollout start --follow`` on a deployment serving a live client (the new version is
    another model, so its predictions differ: the drift gate is opened to 1): the rollout completes;
    every answer is exactly one version's output (never a mix), the last ones the new version's.  A
    rollback after completion is refused without the fleet key and with a wrong key; with the fleet
    key it switches back to the previous version, still loaded, and answers are the old version's."""
    swarm.deploy("roll")
    new = swarm.package("roll", "2")
    with Client(swarm, "roll") as client:
        r = swarm.cli(
            "rollout", "start", "roll", "--package", str(new), "--stages", "50%,100%", "--bake", "1s",
            "--min-samples", "20", "--max-p95-regression", "200%", "--max-drift", "1", "--follow", "--json",
        )  # fmt: skip
        done_at = time.monotonic()
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["final"] == "completed" and st["old_version"] == "1" and st["new_version"] == "2", st
    assert [s["action"] for s in st["steps"]] == ["advance", "advance", "complete"]
    assert st["mixed_version_requests"] == 0 and not client.errors
    seen = [(t, client.version_of(j, out)) for t, j, out in client.answers]
    assert all(v in ("1", "2") for _, v in seen), "an answer matched neither version's whole model"
    assert {v for t, v in seen if t > done_at + 0.2} == {"2"}

    status = json.loads(swarm.cli("rollout", "status", "roll", "--json").stdout)
    assert status["status"] == "completed" and status["steps"] == st["steps"]

    assert_one_line_error(swarm.cli("rollout", "rollback", "roll"), "rollback instruction signed")
    from meshai.packages import keygen

    wrong, _ = keygen(swarm.work / "not-the-fleet")
    assert_one_line_error(
        swarm.cli("rollout", "rollback", "roll", "--key", str(wrong)), "not signed by the trusted key"
    )
    with Client(swarm, "roll") as client:  # the switch back happens under load: nothing is dropped
        r = swarm.cli("rollout", "rollback", "roll", "--key", str(test_secrets().key), "--json")
        back_at = time.monotonic()
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr
    back = json.loads(r.stdout)
    assert back["rolled_back_to"] == "roll@1" and back["version"] == "1"
    assert back["switch"] == "switched to the previous version, still loaded"
    assert not client.errors
    seen = [(t, client.version_of(j, out)) for t, j, out in client.answers]
    assert all(v in ("1", "2") for _, v in seen)
    assert {v for t, v in seen if t > back_at + 0.2} == {"1"}
    listed = json.loads(swarm.cli("deployments", "--json").stdout)["deployments"]
    assert next(d for d in listed if d["name"] == "roll")["package"] == "roll@1"


def test_operator_pauses_resumes_and_rolls_back_a_canary(swarm: Swarm) -> None:
    """A canary under a long bake: pause holds it, resume carries on, rollback (no key needed: the old
    version never stopped being the active one) sends everything back; starting an older version is
    refused with a clear error."""
    swarm.deploy("ops")
    with Client(swarm, "ops"):
        r = swarm.cli(
            "rollout", "start", "ops", "--package", str(swarm.package("ops", "3")), "--bake", "5m",
            # gates wide open: here only the operator acts (a live gate may roll back first otherwise)
            "--max-p95-regression", "1000%", "--max-drift", "1", "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "baking"
        st = json.loads(swarm.cli("rollout", "pause", "ops", "--json").stdout)
        assert st["status"] == "paused" and st["steps"][-1]["action"] == "pause"
        st = json.loads(swarm.cli("rollout", "resume", "ops", "--json").stdout)
        assert st["status"] == "baking" and st["steps"][-1]["action"] == "resume"
        r = swarm.cli("rollout", "rollback", "ops", "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["final"] == "rolled_back" and st["share"] == 0.0
        assert "rolled back by the operator" in st["reason"]
    with Client(swarm, "ops") as client:
        time.sleep(0.3)
    assert {client.version_of(j, out) for _, j, out in client.answers} == {"1"}
    older = swarm.package("ops", "1")
    assert_one_line_error(
        swarm.cli("rollout", "start", "ops", "--package", str(older)), "not newer than ops@1"
    )
    assert_one_line_error(swarm.cli("rollout", "status", "nope"), "no deployment named 'nope'")


def test_ab_split_by_robot_accounting_accuracy_and_plot(swarm: Swarm, tmp_path: Path) -> None:
    """``meshai ab start --split 30% --by robot``: every robot's requests land wholly on the side its
    hash gives (the accounting matches the split request for request), labels (version 1's answers)
    give A 100 % and B less, the report tests the differences and draws the PNG; after ``stop`` every
    request runs on A."""
    swarm.deploy("abt")
    b = swarm.package("abt", "2")
    r = swarm.cli("ab", "start", "abt", "--variant", f"B={b}", "--split", "30%", "--by", "robot", "--json")
    assert r.returncode == 0, r.stderr
    reqs = request_slices(random_inputs(onnx.load(str(swarm.models["1"])), seed=4, requests=12))
    labels = [int(np.argmax(run_whole(onnx.load(str(swarm.models["1"])), q)["logits"])) for q in reqs]
    stacked = {k: np.stack([q[k] for q in reqs]) for k in reqs[0]}  # one request per row
    np.savez(tmp_path / "in.npz", **stacked)
    np.savez(tmp_path / "labels.npz", labels=np.asarray(labels, dtype=np.int64))
    robots = [f"robot{i}" for i in range(6)]
    for robot in robots:
        r = swarm.cli(
            "infer", "abt", "--inputs", str(tmp_path / "in.npz"), "--labels", str(tmp_path / "labels.npz"),
            "--key", robot, "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    png = tmp_path / "ab.png"
    r = swarm.cli("ab", "report", "abt", "--png", str(png), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    on_b = [x for x in robots if split(x, 0.3, "abt@ab2")]
    assert 0 < len(on_b) < len(robots)
    assert rep["variants"]["B"]["requests"] == 12 * len(on_b)
    assert rep["variants"]["A"]["requests"] == 12 * (len(robots) - len(on_b))
    assert (
        rep["variants"]["A"]["correct"]
        == rep["variants"]["A"]["labelled"]
        == rep["variants"]["A"]["requests"]
    )
    assert rep["variants"]["B"]["correct"] < rep["variants"]["B"]["labelled"]
    acc = rep["tests"]["accuracy"]
    assert (acc["n_a"], acc["n_b"]) == (rep["variants"]["A"]["labelled"], rep["variants"]["B"]["labelled"])
    assert rep["tests"]["latency"]["n_b"] == 12 * len(on_b) and rep["mixed_version_requests"] == 0
    assert png.stat().st_size > 10_000 and rep["png"] == str(png)
    r = swarm.cli("ab", "stop", "abt", "--no-png", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["running"] is False
    r = swarm.cli("infer", "abt", "--inputs", str(tmp_path / "in.npz"), "--key", on_b[0], "--json")
    assert r.returncode == 0, r.stderr
    r = swarm.cli("ab", "report", "abt", "--no-png", "--json")
    assert json.loads(r.stdout)["variants"]["A"]["requests"] == 12 * (len(robots) - len(on_b) + 1)
    assert_one_line_error(swarm.cli("ab", "start", "abt", "--variant", f"A={b}"), "--variant must be B=PKG")


def test_cli_help_names_the_commands() -> None:
    for words in (["rollout", "start"], ["rollout", "rollback"], ["ab", "start"], ["ab", "report"]):
        r = subprocess.run([*MESHAI, *words, "--help"], capture_output=True, text=True, env=child_env())
        assert r.returncode == 0 and "--json" in r.stdout, r.stderr
